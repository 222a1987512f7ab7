"""The embedded model's local tokenizer: sized to the vocabulary, deterministic, chat-ready."""

from __future__ import annotations

from pathlib import Path

from glmdeploy.loading.embedded_tokenizer import (
    MIN_VOCAB,
    SPECIALS,
    build_tokenizer,
    write_tokenizer,
)


def test_the_tokenizer_fills_the_vocabulary_exactly() -> None:
    for size in (MIN_VOCAB, 512, 2000):  # 2000: past what the corpus teaches, reserved tokens fill
        tokenizer = build_tokenizer(size)
        assert tokenizer is not None and len(tokenizer) == size
        assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIALS] == [0, 1, 2, 3, 4]
    assert build_tokenizer(MIN_VOCAB - 1) is None  # no room for the bytes and the special tokens


def test_any_text_round_trips_and_the_chat_template_is_glm_like() -> None:
    tokenizer = build_tokenizer(512)
    assert tokenizer is not None
    for text in ("héllo wörld 🙂", "def f():\n\treturn 1", "北京的天气怎么样？"):
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"


def test_building_twice_gives_identical_files(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    write_tokenizer(first, 512)
    write_tokenizer(second, 512)
    names = sorted(p.name for p in first.iterdir())
    assert names == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    assert all((first / n).read_bytes() == (second / n).read_bytes() for n in names)
