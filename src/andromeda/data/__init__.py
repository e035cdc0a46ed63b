"""Text data: the default Shakespeare corpus, reading files, a token cache, and batch sampling.

The pipeline is ``resolve_data`` (specs to files) -> ``tokenize_corpus`` / ``TokenStore``
(documents to cached token arrays, one per input file, tokenised in parallel, concatenated into
one memory-mapped array) -> ``sample_batch`` for training or ``eval_windows`` for evaluation.

Modules: ``blocks`` (a file's bytes in bounded blocks, decompressed and decoded), ``formats``
(each file type as a stream of documents), ``splitting`` (where a long text may be cut without
changing its ids), ``encoding`` and ``worker`` / ``pool`` (tokenising in worker processes),
``atomic``, ``snapshot`` and ``store`` (the cache), ``sampling``, ``shakespeare``.
"""

from .encoding import token_dtype
from .formats import DATA_SUFFIXES, iter_documents, iter_texts, resolve_data
from .sampling import EvalWindow, eval_windows, sample_batch
from .shakespeare import SHAKESPEARE_HELDOUT, shakespeare_corpus
from .store import (
    TokenizeStats,
    TokenStore,
    cache_root,
    default_num_proc,
    token_cache_dir,
    tokenize_corpus,
)

__all__ = [
    "DATA_SUFFIXES", "EvalWindow", "SHAKESPEARE_HELDOUT", "TokenStore", "TokenizeStats",
    "cache_root", "default_num_proc", "eval_windows", "iter_documents", "iter_texts",
    "resolve_data", "sample_batch", "shakespeare_corpus", "token_cache_dir", "token_dtype",
    "tokenize_corpus",
]
