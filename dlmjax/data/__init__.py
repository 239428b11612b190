"""SFT data: JSONL records -> tokenized examples (`sft`) -> static-shape grain batches (`pipeline`)."""
from dlmjax.data.pipeline import (
    SFTDataConfig, build_examples, collate, make_iterator, num_steps, shuffle_seed, steps_per_epoch,
)
from dlmjax.data.sft import DataError, read_records, sft_special_ids, tokenize_record

__all__ = ["DataError", "SFTDataConfig", "build_examples", "collate", "make_iterator", "num_steps", "read_records",
           "sft_special_ids", "shuffle_seed", "steps_per_epoch", "tokenize_record"]
