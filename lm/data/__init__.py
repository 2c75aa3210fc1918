"""The data layer: text sources, tokenizers, packing and the resumable sharded batch loader.

Typical use (what the trainer does)::

    from lm.data import DataConfig, build_data
    data = build_data(cfg.data, run_dir, sharding=batch_sharding)  # NamedSharding of (B, T) or None;
                                                    # tokenizer saved to / reused from run_dir/tokenizer
    data.restore(saved_state)                       # optional, after a checkpoint
    batch = data.next_batch()                       # {"inputs", "targets", "mask"}: (B, T) global arrays
    state = data.state()                            # small dict of ints: checkpoint it
    for batch in data.val_batches(): ...            # validation blocks in order (see eval_batches)
    bpb = loss_nats / math.log(2) / data.val_bytes_per_token   # = data.val.bits_per_byte(loss_nats)
"""

from lm.data.config import DataConfig, DataError, TokenizerConfig
from lm.data.loader import BatchLoader, DataBundle, build_data, check_batch_size, data_shards, eval_batches
from lm.data.packing import PackedTokens, pack, split_tail, tokenize_documents
from lm.data.sources import iter_documents, iter_local_documents
from lm.data.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_sentencepiece,
    train_tokenizer,
)

__all__ = [
    "BatchLoader",
    "ByteTokenizer",
    "CharTokenizer",
    "DataBundle",
    "DataConfig",
    "DataError",
    "PackedTokens",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerConfig",
    "build_data",
    "check_batch_size",
    "data_shards",
    "eval_batches",
    "iter_documents",
    "iter_local_documents",
    "load_tokenizer",
    "pack",
    "split_tail",
    "tokenize_documents",
    "train_sentencepiece",
    "train_tokenizer",
]
