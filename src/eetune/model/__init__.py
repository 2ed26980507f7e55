"""The model wing: family adapters (where a model's embeddings, layers, norm, head and positions
are), loading and partial loading (`backbone`), exit heads (`heads`) and gates (`gates`), the
exit configuration (`config`), `EarlyExitModel` and the exits directory (`early_exit`), and the
embedded default model and data (`defaults`). Everything else in eetune builds on it."""

from eetune.model.backbone import LayerCache, load_backbone, load_tokenizer
from eetune.model.config import ExitConfig
from eetune.model.early_exit import EarlyExitModel, ExitOutput

__all__ = ["EarlyExitModel", "ExitConfig", "ExitOutput", "LayerCache", "load_backbone", "load_tokenizer"]
