"""A tiny random T5 encoder + tokenizer made on the spot (no download), for tests and the demo.

    from data_pipeline.toy_text import make_tiny_t5
    path = make_tiny_t5("tiny_t5")        # load_text_encoder(path) works offline; width 32, 120 tokens

The tokenizer is a 64-piece Unigram model trained on a few sentences, with T5's special tokens (``<pad>`` 0,
``</s>`` 1, ``<unk>`` 2) and ``</s>`` appended to every text, so "" encodes to one token as T5's does.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "a dog runs on the beach at sunset",
    "a cat sleeps on a red sofa in the living room",
    "waves crash against the rocks under a grey sky",
    "a man rides a bicycle through the city streets",
    "two children play football in a green park",
    "a square moves slowly from left to right",
]


def make_tiny_t5(directory: str | Path, width: int = 32, max_length: int = 120, seed: int = 0) -> Path:
    """Save a random ``T5EncoderModel`` of ``width`` (2 layers, 4 heads) and its tokenizer to ``directory``
    (both load with ``from_pretrained(directory)``) and return the directory."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    directory = Path(directory)
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=64, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tokenizer.token_to_id("</s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
    )
    fast.save_pretrained(directory)
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=tokenizer.get_vocab_size(),
        d_model=width,
        d_kv=8,
        d_ff=2 * width,
        num_layers=2,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    T5EncoderModel(config).save_pretrained(directory)
    return directory
