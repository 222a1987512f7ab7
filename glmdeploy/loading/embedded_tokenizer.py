"""A small, real tokenizer for an embedded model, trained locally and deterministically.

Embedded models (`model.source.kind: embedded`) have seeded random weights and no download, so they
have no tokenizer of their own. This trains a byte-level BPE tokenizer on a fixed in-repo corpus,
sized to the model's vocabulary (learned merges, then reserved special tokens up to the size), with
a GLM-like chat template, so that text, chat and `glmdeploy serve` run end to end anywhere.
Byte-level BPE encodes any text without unknown tokens; the same inputs give byte-identical files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

EOS, USER, ASSISTANT, SYSTEM, PAD = (
    "<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<pad>",
)  # fmt: skip
SPECIALS = (EOS, USER, ASSISTANT, SYSTEM, PAD)  # ids 0..4
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_BYTES = 256  # the byte-level alphabet every vocabulary starts with
MIN_VOCAB = _BYTES + len(SPECIALS)

# Fixed training text: changing it changes every embedded model's tokenizer (bump
# `glmdeploy.loading.embedded.MATERIALIZE_VERSION` with it).
CORPUS = (
    "The capital of France is Paris, and the capital of Germany is Berlin.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "glmdeploy plans a device map, loads the model exactly as planned, and verifies every tensor.",
    "Hello! How are you today? I am a tiny language model with random weights.",
    "Please answer briefly and politely, in one or two sentences.",
    "A deployment says which model runs on which GPUs, in which precision, with which context.",
    "The server answers chat completions and text completions over HTTP, one token at a time.",
    "Tensor parallelism splits every layer across devices; pipeline parallelism splits the layers.",
    "The key-value cache grows with the batch size and with the number of tokens in the context.",
    "Memory is measured in bytes, kibibytes, mebibytes and gibibytes; 1 GiB is 1073741824 bytes.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096 8192 32768.",
    "What is the weather like in Beijing? It is sunny, with a light wind from the north.",
    "Write a short poem about the sea: waves rise, waves fall, and the moon watches them all.",
    "Translate into English: bonjour means hello, merci means thank you, oui means yes.",
    "Summarise the following document in three bullet points, then list the open questions.",
    "The system prompt sets the assistant's role; the user asks, and the assistant replies.",
    "Errors say where the problem is, what was found, what was expected, and how to fix it.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5",
    '{"model": "tiny-glm", "messages": [{"role": "user", "content": "Hi"}], "stream": true}',
    "Large language models predict the next token from the tokens that came before it.",
    "Every request gets an answer or a clear error; the server keeps serving either way.",
    "Good morning, good afternoon, good evening and good night to everyone reading this.",
    "Students read books in the library, teachers write notes on the board, children play.",
    "Rivers flow into the ocean, mountains rise above the clouds, and forests cover the hills.",
)
_REPEATS = 8  # frequencies for the merges; the text itself decides which merges exist


def build_tokenizer(vocab_size: int) -> Any | None:
    """A `PreTrainedTokenizerFast` with exactly `vocab_size` tokens, or None when the vocabulary
    cannot hold the byte alphabet and the special tokens (`MIN_VOCAB`)."""
    if vocab_size < MIN_VOCAB:
        return None
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator([line for line in CORPUS for _ in range(_REPEATS)], trainer=trainer)
    reserved = [f"<|reserved_{i}|>" for i in range(vocab_size - tok.get_vocab_size())]
    if reserved:  # the corpus ran out of merges: the remaining ids still decode to something
        tok.add_special_tokens(reserved)
    fast: Any = PreTrainedTokenizerFast
    return fast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, chat_template=CHAT_TEMPLATE)


def write_tokenizer(directory: Path, vocab_size: int) -> Any | None:
    """Build the tokenizer and save it into `directory` (tokenizer.json, tokenizer_config.json,
    chat_template.jinja); returns it, or None when the vocabulary is too small for one."""
    tokenizer = build_tokenizer(vocab_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return tokenizer
