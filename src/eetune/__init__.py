"""eetune: turn a pretrained Hugging Face causal LM into an early-exit LM (EE-Tuning) and
decode faster with it. See README.md; the pipeline is convert -> tune -> decode -> evaluate."""

__version__ = "0.1.0"

from .backbone import LayerCache, load_backbone, load_tokenizer  # noqa: E402
from .config import ExitConfig  # noqa: E402
from .errors import EETuneError  # noqa: E402
from .model import EarlyExitModel, ExitOutput  # noqa: E402

__all__ = ["EarlyExitModel", "ExitOutput", "ExitConfig", "EETuneError", "LayerCache", "load_backbone",
           "load_tokenizer", "__version__"]
