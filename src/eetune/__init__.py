"""eetune: turn a pretrained Hugging Face causal LM into an early-exit LM (EE-Tuning) and
decode faster with it. The pipeline is convert -> tune -> decode -> measure, one wing each:
`eetune.model`, `eetune.train`, `eetune.decode`, `eetune.measure`; `eetune.cli` on top."""

from eetune.decode import DecodeOptions, custom_generate, generate
from eetune.errors import EETuneError
from eetune.model import EarlyExitModel, ExitConfig, ExitOutput, LayerCache, load_backbone, load_tokenizer
from eetune.version import __version__

__all__ = ["DecodeOptions", "EarlyExitModel", "ExitOutput", "ExitConfig", "EETuneError", "LayerCache", "custom_generate",
           "generate", "load_backbone", "load_tokenizer", "__version__"]
