"""tunelab: fine-tune pre-trained language models and see what fine-tuning does."""

from .config import Config, load_config
from .errors import TunelabError

__version__ = "0.1.0"


def train(cfg: Config, resume: bool = False, quiet: bool = False):
    """Run a recipe end to end (see tunelab.train.loop.train); returns the run directory."""
    from .train.loop import train as _train

    return _train(cfg, resume=resume, quiet=quiet)


__all__ = ["Config", "TunelabError", "load_config", "train", "__version__"]
