"""Sparse dictionaries over lists of sites: SAEs, transcoders and crosscoders on one interface.

`Dictionary` (encode, decode, forward), activations registered by name (`activations.py`), one trainer
(`train_dictionary`), one file format (`save_dictionary`, `load_dictionary`), and exchange with SAELens and
sparsify (`export_saelens`, `import_saelens`, `import_sparsify`; `load_any` reads every layout).
"""

from mechscope.dictionaries.dictionary import DictConfig, Dictionary, DictOutput
from mechscope.dictionaries.formats import export_saelens, import_saelens, import_sparsify, load_any
from mechscope.dictionaries.formats.own import load_dictionary, save_dictionary
from mechscope.dictionaries.sparse import Active
from mechscope.dictionaries.train import TrainConfig, train_dictionary

__all__ = [
    "Active",
    "DictConfig",
    "DictOutput",
    "Dictionary",
    "TrainConfig",
    "export_saelens",
    "import_saelens",
    "import_sparsify",
    "load_any",
    "load_dictionary",
    "save_dictionary",
    "train_dictionary",
]
