"""A conversation with a model, rendered with the same chat template as training (``tunelab chat``): a run
directory's model with the run's template and system prompt, or any model by alias, directory or hub id."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config.schema import Device
from .errors import TunelabError
from .tasks import task_of


@dataclass
class Conversation:
    model: Any
    tok: Any
    template: Any  # a resolved data.chat.ChatTemplate
    stop: int  # the template's end-of-turn token: a reply ends there
    system: str | None = None
    system_fallback: str = "fold"  # a template that refuses a system message (chat.system_fallback)
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start over: only the system prompt, if any."""
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
              seed: int | None = 0) -> str:
        """The model's answer to the user's ``text`` (temperature 0: greedy), both kept in the history."""
        from .data import chat
        from .generate import generate

        self.history.append({"role": "user", "content": text})
        shown, _ = chat.fit_system(self.history, self.template, self.tok, self.system_fallback)
        prompt = chat.render(self.template, self.history if shown is None else shown, True, self.tok, "chat")
        ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        (answer,), = generate(self.model, self.tok, [ids], max_new_tokens=max_new_tokens, batch_size=1,
                              temperature=temperature, top_p=top_p, seed=seed, stop_ids=[self.stop])
        answer = answer.strip()
        self.history.append({"role": "assistant", "content": answer})
        return answer


def open_conversation(target: str, device: Device = "auto", template: str | None = None,
                      system: str | None = None) -> Conversation:
    """A conversation with a run directory's model (its chat template, stop token and system prompt unless
    ``template`` or ``system`` say otherwise) or with a model (``template`` default auto)."""
    from .config import ModelConfig, load_config
    from .data import chat
    from .models import load_model, load_trained

    path = Path(target)
    stop_token = None
    fallback = "fold"
    if path.is_dir() and (path / "config.yaml").exists():
        cfg = load_config(path)
        cfg.model.device = device
        task = task_of(cfg)
        if not task.by_generation:
            raise TunelabError("a classification run does not generate: use tunelab predict", str(path))
        stop_token, trained_system = task.chat_defaults(cfg)
        model, tok = load_trained(path, cfg.model)
        template = template or cfg.chat.template
        if system is None:
            system = trained_system
        fallback = cfg.chat.system_fallback
    else:
        if path.suffix in (".yaml", ".yml"):
            raise TunelabError("give a run directory or a model (name, alias or directory), not a recipe", str(path))
        model, tok = load_model(ModelConfig(name=target, device=device))
        template = template or "auto"
    tmpl = chat.resolve_template(template, tok, stop_token)
    return Conversation(model, tok, tmpl, chat.stop_id(tmpl, tok), system, fallback)
