"""Records to Examples: readers, templates, formats, batching."""
