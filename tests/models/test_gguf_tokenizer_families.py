"""Tokenizers rebuilt from GGUF metadata encode and decode like the models' own tokenizer.json.

For each family a small vocabulary is trained on the sample text, written as llama.cpp writes
GGUF metadata, and rebuilt by `build_tokenizer` / `write_tokenizer_files`. The reference is a
tokenizer.json configured as the family's published one (Qwen2, Llama 3, SmolLM2, GPT-2,
Llama 2 / Mistral, Phi-3, Gemma 3), over the same vocabulary.
"""

from __future__ import annotations

import functools
import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

from trioserve.models.tokenizer import (
    TokenizerMetadataError,
    build_tokenizer,
    write_tokenizer_files,
)

SAMPLE = unicodedata.normalize(
    "NFC",
    "Héllo wörld, naïve café! Ünïcödé. 日本語のテキストです。中文字符 Привет, как дела? "
    "مرحبا بالعالم 🚀🎉 12345 and 2024-06-01. I don't know, you'll see, we've been.\t"
    "Tabs\tand\nnew\n\nlines,   three spaces  two  end",
)
CORPUS = [SAMPLE] * 20 + [
    "hello world hello world the quick brown fox don't stop",
    "Привет мир привет мир 日本語 日本 中文 中文",
]

UNMERGED = "Ġzqxjv"  # byte-level spelling of " zqxjv"
# Not NFC: "é" as e + combining acute, which Qwen's normalizer composes.
DECOMPOSED = "cafe\u0301 "

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(use_regex: bool) -> dict:
    return {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": use_regex,
    }


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


_SPM_DECODER = [
    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
    {"type": "ByteFallback"},
    {"type": "Fuse"},
]
_SPACE_TO_MARK = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}

# The normalizer / pre_tokenizer / decoder / model flags of each published tokenizer.json.
SPECS = {
    "qwen2": {
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [_split(QWEN2_REGEX), _byte_level(False)],
        },
        "decoder": _byte_level(False),
    },
    "llama3": {
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [_split(LLAMA3_REGEX), _byte_level(False)],
        },
        "decoder": _byte_level(True),
        "model": {"ignore_merges": True},
    },
    "smollm": {
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": True}, _byte_level(True)],
        },
        "decoder": _byte_level(True),
    },
    "gpt2": {"normalizer": None, "pre_tokenizer": _byte_level(True), "decoder": _byte_level(True)},
    "llama2": {  # also Mistral v0.1 and Phi-3 (legacy Llama tokenizer.json)
        "normalizer": {
            "type": "Sequence",
            "normalizers": [{"type": "Prepend", "prepend": "▁"}, _SPACE_TO_MARK],
        },
        "pre_tokenizer": None,
        "decoder": {
            "type": "Sequence",
            "decoders": _SPM_DECODER + [{"type": "Strip", "content": " ", "start": 1, "stop": 0}],
        },
        "model": {"unk_token": "<unk>", "fuse_unk": True, "byte_fallback": True},
    },
    "gemma": {
        "normalizer": _SPACE_TO_MARK,
        "pre_tokenizer": {
            "type": "Split",
            "pattern": {"String": " "},
            "behavior": "MergedWithPrevious",
            "invert": False,
        },
        "decoder": {"type": "Sequence", "decoders": _SPM_DECODER},
        "model": {"unk_token": "<unk>", "fuse_unk": True, "byte_fallback": True},
    },
}


@dataclass(frozen=True)
class Family:
    name: str
    spec: str  # its key in SPECS
    gguf: dict  # the family's own GGUF keys (model, pre, architecture, flags)
    eos: str
    head: tuple[str, ...] = ()  # control tokens before the vocabulary (SentencePiece: ids 0..)
    tail: tuple[str, ...] = ()  # control tokens after it
    user: tuple[str, ...] = ()  # user-defined tokens (type 4)
    bos: str | None = None
    add_bos: bool = False
    eot: str | None = None  # end of turn; generation stops on it too
    eot_in_file: bool = True  # as tokenizer.ggml.eot_token_id, else found by its name
    rstrip: frozenset[str] = frozenset()  # added tokens that swallow the whitespace after them

    @property
    def sentencepiece(self) -> bool:
        return self.gguf["tokenizer.ggml.model"] == "llama"

    @property
    def space_prefix(self) -> bool:
        return self.spec == "llama2"


def _bpe(pre: str, arch: str) -> dict:
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "general.architecture": arch}


def _spm(arch: str, **flags) -> dict:
    return {"tokenizer.ggml.model": "llama", "general.architecture": arch} | {
        f"tokenizer.ggml.{k}": v for k, v in flags.items()
    }


_CHATML = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>")
_LLAMA3_SPECIALS += ("<|end_header_id|>", "<|eom_id|>", "<|eot_id|>")
_PHI3_SPECIALS = ("<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>")

FAMILIES = [
    Family("qwen2", "qwen2", _bpe("qwen2", "qwen2"), "<|im_end|>", tail=_CHATML,
           user=("<think>", "</think>")),
    Family("llama3", "llama3", _bpe("llama-bpe", "llama"), "<|end_of_text|>",
           tail=_LLAMA3_SPECIALS, bos="<|begin_of_text|>", add_bos=True, eot="<|eot_id|>"),
    Family("smollm", "smollm", _bpe("smollm", "llama"), "<|im_end|>", head=_CHATML,
           bos="<|im_start|>"),
    Family("gpt2", "gpt2", _bpe("gpt-2", "gpt2"), "<|endoftext|>", tail=("<|endoftext|>",)),
    Family("llama2", "llama2", _spm("llama"), "</s>", head=("<unk>", "<s>", "</s>"), bos="<s>",
           add_bos=True),
    Family("phi3", "llama2", _spm("phi3", add_space_prefix=True), "<|endoftext|>",
           head=("<unk>", "<s>", "</s>"), tail=_PHI3_SPECIALS, bos="<s>", eot="<|end|>",
           eot_in_file=False, rstrip=frozenset({"</s>", "<|assistant|>", "<|end|>", "<|user|>"})),
    Family("gemma3", "gemma", _spm("gemma3", add_space_prefix=False), "<eos>",
           head=("<pad>", "<eos>", "<bos>", "<unk>"), tail=("<start_of_turn>", "<end_of_turn>"),
           user=("<start_of_image>",), bos="<bos>", add_bos=True, eot="<end_of_turn>",
           eot_in_file=False),
]  # fmt: skip


# ---- vocabularies, trained on the sample so that merges fire on it -------------------------


def _merges_of(tok: Tokenizer) -> list[tuple[str, str]]:
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


@functools.cache
def _train_byte_level() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """One byte-level vocabulary for all families, learned on looser words (a space and what
    follows up to the next space) so that its merges also cross the families' split rules:
    digit runs, contractions, punctuation before letters."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\s?\S+|\s+"), "isolated"),
            pre_tokenizers.ByteLevel(use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    vocab = tok.get_vocab()
    return tuple(sorted(vocab, key=vocab.get)), tuple(_merges_of(tok))


def _train_pieces(family: Family) -> tuple[list[str], list[str]]:
    """SentencePiece-style pieces: (merged pieces in merge order, single characters)."""
    tok = Tokenizer(models.BPE())
    steps = [normalizers.Prepend("▁")] if family.space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=True)
    # A small alphabet leaves the rarer scripts and the emoji to the byte fallback.
    trainer = trainers.BpeTrainer(vocab_size=450, limit_alphabet=60, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    merged = [left + right for left, right in _merges_of(tok)] + ["▁▁", "▁▁▁"]
    chars = [t for t in sorted(tok.get_vocab(), key=tok.get_vocab().get) if t not in merged]
    return merged, chars


@dataclass
class Vocabulary:
    tokens: list[str]
    types: list[int]
    scores: list[float]
    merges: list[tuple[str, str]]  # the reference's
    gguf_merges: list[str] | None  # the file's (byte-level only)


def _byte_level_vocabulary(family: Family) -> Vocabulary:
    body, merges = _train_byte_level()
    # A word in the vocabulary that no merge builds: one token only where merges are ignored.
    body = list(body) + [UNMERGED]
    tokens = list(family.head) + body + list(family.tail) + list(family.user)
    types = (
        [3] * len(family.head) + [1] * len(body) + [3] * len(family.tail) + [4] * len(family.user)
    )
    return Vocabulary(tokens, types, [0.0] * len(tokens), merges, [f"{a} {b}" for a, b in merges])


def _sentencepiece_vocabulary(family: Family) -> Vocabulary:
    from transformers.tokenization_utils_base import generate_merges

    merged, chars = _train_pieces(family)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    pieces = merged + chars
    tokens = list(family.head) + byte_tokens + pieces + list(family.tail) + list(family.user)
    types = (
        [2 if t == "<unk>" else 3 for t in family.head]
        + [6] * 256
        + [1] * len(pieces)
        + [3] * len(family.tail)
        + [4] * len(family.user)
    )
    piece_scores = [-float(i) for i in range(len(pieces))]  # merge order, as SentencePiece scores
    scores = (
        [0.0] * (len(family.head) + 256)
        + piece_scores
        + [0.0] * (len(family.tail) + len(family.user))
    )
    # The reference merges: derived from the vocabulary as transformers' converter does.
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = generate_merges(
        vocab, dict(zip(pieces, piece_scores, strict=True)), skip_tokens=set(tokens) - set(pieces)
    )
    return Vocabulary(tokens, types, scores, merges, None)


def _vocabulary(family: Family) -> Vocabulary:
    if family.sentencepiece:
        return _sentencepiece_vocabulary(family)
    return _byte_level_vocabulary(family)


def _gguf_spelling(family: Family, token: str) -> str:
    # Gemma GGUFs store runs of spaces as real spaces.
    return token.replace("▁", " ") if family.spec == "gemma" and set(token) == {"▁"} else token


def _metadata(family: Family, vocab: Vocabulary) -> dict:
    tokens = vocab.tokens
    md = dict(family.gguf)
    md |= {
        "tokenizer.ggml.tokens": [_gguf_spelling(family, t) for t in tokens],
        "tokenizer.ggml.token_type": vocab.types,
        "tokenizer.ggml.eos_token_id": tokens.index(family.eos),
        "tokenizer.ggml.add_bos_token": family.add_bos,
        "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    if vocab.gguf_merges is not None:
        md["tokenizer.ggml.merges"] = vocab.gguf_merges
    else:
        md["tokenizer.ggml.scores"] = vocab.scores
        md["tokenizer.ggml.unknown_token_id"] = tokens.index("<unk>")
    if family.bos:
        md["tokenizer.ggml.bos_token_id"] = tokens.index(family.bos)
    if family.eot and family.eot_in_file:
        md["tokenizer.ggml.eot_token_id"] = tokens.index(family.eot)
    if "<|eom_id|>" in tokens:
        md["tokenizer.ggml.eom_token_id"] = tokens.index("<|eom_id|>")
    return md


# ---- the reference: a tokenizer.json as the family publishes it ---------------------------


def _template(bos: str, bos_id: int) -> dict:
    def seq(name: str, type_id: int) -> list:
        return [
            {"SpecialToken": {"id": bos, "type_id": type_id}},
            {"Sequence": {"id": name, "type_id": type_id}},
        ]

    return {
        "type": "TemplateProcessing",
        "single": seq("A", 0),
        "pair": seq("A", 0) + seq("B", 1),
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }


def _from_spec(
    spec: dict,
    vocab: dict,
    merges: list,
    added: list,
    rstrip: frozenset,
    bos: tuple[str, int] | None,
) -> Tokenizer:
    model = {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": False,
        "vocab": vocab,
        "merges": [list(m) for m in merges],
    } | spec.get("model", {})
    added_tokens = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": t in rstrip,
            "normalized": False,
            "special": special,
        }
        for i, t, special in added
    ]
    data = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": spec["normalizer"],
        "pre_tokenizer": spec["pre_tokenizer"],
        "post_processor": _template(*bos) if bos else None,
        "decoder": spec["decoder"],
        "model": model,
    }
    return Tokenizer.from_str(json.dumps(data))


def _reference(family: Family, vocab: Vocabulary) -> Tokenizer:
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    added = [
        (i, t, k != 4)
        for i, (t, k) in enumerate(zip(vocab.tokens, vocab.types, strict=True))
        if k in (2, 3, 4)
    ]
    bos = (family.bos, ids[family.bos]) if family.add_bos else None
    return _from_spec(SPECS[family.spec], ids, vocab.merges, added, family.rstrip, bos)


# ---- fixtures --------------------------------------------------------------------------------


@dataclass
class Built:
    family: Family
    vocab: Vocabulary
    metadata: dict
    reference: Tokenizer
    ours: Tokenizer
    hf: object  # mlx-lm's TokenizerWrapper over the written files
    out: Path

    def text_with_specials(self) -> str:
        f = self.family
        marks = f.head + f.tail + f.user
        return SAMPLE + DECOMPOSED + " zqxjv" + "".join(f"{m}\nturn {m} don't{m}  x" for m in marks)


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f.name)
def built(request, tmp_path_factory) -> Built:
    from mlx_lm.utils import load_tokenizer

    family = request.param
    vocab = _vocabulary(family)
    metadata = _metadata(family, vocab)
    out = tmp_path_factory.mktemp(family.name)
    write_tokenizer_files(metadata, out, 4096)
    # As mlx_lm.load does: the eos ids come from generation_config.json.
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    hf = load_tokenizer(Path(out), eos_token_ids=eos)
    return Built(
        family, vocab, metadata, _reference(family, vocab), build_tokenizer(metadata), hf, out
    )


# ---- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("with_specials", [False, True], ids=["plain", "specials"])
def test_ids_and_decode_match_the_published_tokenizer(built, with_specials):
    text = built.text_with_specials() if with_specials else SAMPLE
    want = built.reference.encode(text).ids
    assert len(want) < len(text) / 1.5, "the merges should fire on the sample"
    assert built.ours.encode(text).ids == want
    assert built.hf.encode(text) == want
    want_text = built.reference.decode(want, skip_special_tokens=False)
    assert built.ours.decode(want, skip_special_tokens=False) == want_text
    assert built.hf.decode(want, skip_special_tokens=False) == want_text


def test_round_trip(built):
    ids = built.hf.encode(SAMPLE, add_special_tokens=False)
    assert built.hf.decode(ids) == SAMPLE
    assert built.ours.decode(built.ours.encode(SAMPLE, add_special_tokens=False).ids) == SAMPLE
    # The streaming detokenizer mlx-lm picks from tokenizer.json gives the same text.
    detokenizer = built.hf.detokenizer
    detokenizer.reset()
    for token in ids:
        detokenizer.add_token(token)
    detokenizer.finalize()
    assert detokenizer.text == SAMPLE


def test_bos_is_added_once_where_the_model_adds_it(built):
    ids = built.hf.encode("hello world")
    tokens = built.vocab.tokens
    if built.family.add_bos:
        assert ids[0] == tokens.index(built.family.bos) and ids.count(ids[0]) == 1
    else:
        assert ids == built.hf.encode("hello world", add_special_tokens=False)
    config = json.loads((built.out / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is built.family.add_bos
    assert config["chat_template"] == built.metadata["tokenizer.chat_template"]


def test_special_and_user_tokens_are_single_ids(built):
    tokens = built.vocab.tokens
    for i, kind in enumerate(built.vocab.types):
        if kind in (3, 4):
            assert built.hf.encode(tokens[i], add_special_tokens=False) == [i], tokens[i]
    assert built.hf.eos_token_id == tokens.index(built.family.eos)


def test_end_of_turn_stops_generation(built):
    tokens = built.vocab.tokens
    stops = {tokens.index(built.family.eos)}
    if built.family.eot:
        stops.add(tokens.index(built.family.eot))
    if "<|eom_id|>" in tokens:
        stops.add(tokens.index("<|eom_id|>"))
    assert built.hf.eos_token_ids == stops
    listed = json.loads((built.out / "generation_config.json").read_text())["eos_token_id"]
    assert set(listed if isinstance(listed, list) else [listed]) == stops


def _llama_cpp_spm(text: str, vocab: Vocabulary, prefix: bool) -> list[int]:
    """llama.cpp's SentencePiece tokenizer: merge the adjacent pair whose joined piece
    scores best (leftmost on ties); what stays unknown falls back to byte tokens."""
    pieces = {t: (i, vocab.scores[i]) for i, t in enumerate(vocab.tokens) if vocab.types[i] == 1}
    symbols = list(("▁" if prefix else "") + text.replace(" ", "▁"))
    while True:
        pairs = [
            (pieces[a + b][1], -i)
            for i, (a, b) in enumerate(zip(symbols, symbols[1:], strict=False))
            if a + b in pieces
        ]
        if not pairs:
            break
        i = -max(pairs)[1]
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    ids = []
    for s in symbols:
        if s in pieces:
            ids.append(pieces[s][0])
        else:
            ids += [vocab.tokens.index(f"<0x{b:02X}>") for b in s.encode()]
    return ids


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.sentencepiece], ids=lambda f: f.name)
def test_sentencepiece_merges_encode_like_llama_cpp(family):
    vocab = _vocabulary(family)
    ours = build_tokenizer(_metadata(family, vocab))
    assert ours.encode(SAMPLE, add_special_tokens=False).ids == _llama_cpp_spm(
        SAMPLE, vocab, family.space_prefix
    )


def test_gemma_needs_no_prefix_flag_nor_scores():
    # A Gemma file without add_space_prefix gets no prefix; its merges follow the piece
    # order, not the scores (as transformers' GGUF loader finds for Gemma).
    family = next(f for f in FAMILIES if f.name == "gemma3")
    metadata = _metadata(family, _vocabulary(family))
    want = build_tokenizer(metadata).encode(SAMPLE).ids
    del metadata["tokenizer.ggml.add_space_prefix"]
    metadata["tokenizer.ggml.scores"] = [0.0] * len(metadata["tokenizer.ggml.tokens"])
    tok = build_tokenizer(metadata)
    assert tok.encode(SAMPLE).ids == want
    assert not tok.encode("Hello", add_special_tokens=False).tokens[0].startswith("▁")


@pytest.mark.parametrize("kind", ["t5", "bert", "rwkv", None])
def test_unsupported_tokenizer_kinds_are_refused(kind):
    with pytest.raises(
        TokenizerMetadataError, match=f"unsupported tokenizer model {kind!r}.*'gpt2'"
    ):
        build_tokenizer({"tokenizer.ggml.model": kind, "tokenizer.ggml.tokens": ["a", "b"]})


def test_unknown_pre_tokenizer_is_refused():
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "no-such-model",
        "tokenizer.ggml.tokens": ["a", "b", "ab"],
        "tokenizer.ggml.merges": ["a b"],
    }
    with pytest.raises(TokenizerMetadataError, match="pre-tokenizer 'no-such-model'.*qwen2"):
        build_tokenizer(metadata)
