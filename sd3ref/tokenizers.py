"""Framework-free tokenizers for the three SD3 text encoders.

* ``CLIPTokenizer``: CLIP's byte-level BPE, bit-compatible with HF ``CLIPTokenizer``
  (transformers 5, backed by the ``tokenizers`` Rust library) and with KerasHub 0.32's
  python path, which builds the same ``tokenizers`` pipeline.
* ``T5Tokenizer``: SentencePiece through the ``sentencepiece`` package, packed the way
  KerasHub's ``T5Preprocessor`` and HF's ``T5Tokenizer(truncation=True)`` pack it. An HF
  ``tokenizer.json`` (all that transformers 5 saves) is rebuilt into the SentencePiece model it
  was converted from.

docs/tokenizers.md explains every rule below, and where the frameworks disagree.
"""

from __future__ import annotations

import base64
import json
import os
import re
import struct
import unicodedata
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "CLIPTokenizer",
    "T5Tokenizer",
    "TokenizerFileError",
    "bytes_to_unicode",
    "normalize_clip_text",
    "CLIP_SEQUENCE_LENGTH",
]

CLIP_SEQUENCE_LENGTH = 77

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# What `\s` means in the Oniguruma regexes of the `tokenizers` library: the Unicode
# White_Space property. Python's `str.isspace()` also accepts U+001C..U+001F, which
# Oniguruma (and so HF) treats as ordinary symbols, so the set is spelled out.
_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
    + "\u2028\u2029\u202f\u205f\u3000"
)

# The contraction alternatives of CLIP's (and GPT-2's) pre-tokenisation regex. They are
# matched case-sensitively, after lowercasing.
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


class TokenizerFileError(ValueError):
    """A tokenizer file is missing or malformed. The message is one line naming the file."""


# --------------------------------------------------------------------------------------
# CLIP: normalisation and pre-tokenisation
# --------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space,
    0x7F..0xA0, 0xAD) map to U+0100 onwards, in byte order, so no BPE symbol is blank.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return dict(sorted(table.items()))


_BYTE_TO_CHAR = [bytes_to_unicode()[b] for b in range(256)]


def normalize_clip_text(text: str) -> str:
    """HF/KerasHub CLIP normaliser: NFC, whitespace runs -> one space, Unicode lowercase.

    Lowercasing is per character, as Rust's ``char::to_lowercase`` in ``tokenizers``:
    Python's ``str.lower`` would turn a word-final capital sigma into "ς", HF gives "σ".
    No strip is needed: the pre-tokeniser drops all whitespace anyway.
    """
    text = unicodedata.normalize("NFC", text)
    out = []
    in_space = False
    for ch in text:
        if ch in _WHITESPACE:
            if not in_space:
                out.append(" ")
            in_space = True
        else:
            out.append(ch.lower())
            in_space = False
    return "".join(out)


def _char_class(ch: str) -> str:
    """'S' whitespace, 'L' letter (\\p{L}), 'N' number (\\p{N}), 'P' anything else."""
    if ch in _WHITESPACE:
        return "S"
    major = unicodedata.category(ch)[0]
    return major if major in "LN" else "P"


def _regex_split(text: str, *, single_digits: bool, literals: Sequence[str] = ()) -> list[str]:
    """Matches of ``literals|'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}(+)|[^\\s\\p{L}\\p{N}]+``.

    A hand-written scanner for the two regexes the HF pipeline applies (``regex`` with
    Unicode classes is not a dependency). Alternatives are tried in order at each
    position, like the regex engine; whitespace matches nothing and is dropped.
    ``single_digits`` selects CLIP's ``[\\p{N}]`` (one digit per match) over GPT-2's
    ``\\p{N}+``.
    """
    pieces = []
    i, n = 0, len(text)
    while i < n:
        fixed = next((s for s in (*literals, *_CONTRACTIONS) if text.startswith(s, i)), None)
        if fixed is not None:
            pieces.append(fixed)
            i += len(fixed)
            continue
        kind = _char_class(text[i])
        if kind == "S":
            i += 1
            continue
        j = i + 1
        if not (kind == "N" and single_digits):
            while j < n and _char_class(text[j]) == kind:
                j += 1
        pieces.append(text[i:j])
        i = j
    return pieces


def _pre_tokenize(normalized: str) -> list[str]:
    """CLIP's Split regex, then the GPT-2 regex that ``ByteLevel(use_regex=True)`` re-applies.

    The second pass changes only one kind of piece: a literal "<|endoftext|>" that came out
    of normalisation (e.g. from "<|EndOfText|>") is cut into "<|", "endoftext", "|>".
    """
    words = []
    for piece in _regex_split(normalized, single_digits=True, literals=(BOS_TOKEN, EOS_TOKEN)):
        words.extend(_regex_split(piece, single_digits=False))
    return words


# --------------------------------------------------------------------------------------
# CLIP: files
# --------------------------------------------------------------------------------------


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise TokenizerFileError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerFileError(f"{path}: cannot read as UTF-8 text ({e})") from None


def _read_json(path: str):
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise TokenizerFileError(f"{path}: not valid JSON ({e})") from None


def _check_vocab(vocab, path: str) -> dict[str, int]:
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerFileError(f"{path}: expected a non-empty JSON object mapping token -> id")
    for token, idx in vocab.items():
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
            raise TokenizerFileError(f"{path}: token {token!r} has id {idx!r}, expected an integer >= 0")
    return vocab


def _parse_merges(lines: Iterable[str], path: str) -> list[tuple[str, str]]:
    """One "a b" rule per line, best first; "#version" header lines are skipped.

    As strict as ``tokenizers``' reader: any other line that is not exactly two
    space-separated symbols is an error (rather than a silently different tokenizer).
    """
    merges = []
    for lineno, line in enumerate(lines, start=1):
        if line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise TokenizerFileError(f"{path}: line {lineno} is not a merge rule 'a b': {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _read_merges(path: str) -> list[tuple[str, str]]:
    text = _read_text(path)
    # split("\n"), not splitlines(): the latter also breaks on U+0085, U+2028, ...
    lines = [line.rstrip("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    return _parse_merges(lines, path)


def _hf_folder_defaults(directory: str) -> dict:
    """Pad token and extra special tokens an HF tokenizer folder declares.

    SD3's ``tokenizer_2`` says ``pad_token: "!"`` and lists "!" as a special added token.
    """
    defaults: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        config = _read_json(path)
        pad = config.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if isinstance(pad, str):
            defaults.setdefault("pad_token", pad)
        added = config.get("added_tokens_decoder")
        if isinstance(added, dict):
            defaults["extra_special_tokens"] = _special_added_tokens(added.values())
    return defaults


def _special_added_tokens(entries: Iterable) -> tuple[str, ...]:
    """Contents of HF added-token records marked special, other than BOS/EOS."""
    return tuple(
        e["content"]
        for e in entries
        if isinstance(e, dict) and e.get("special") and isinstance(e.get("content"), str)
        and e["content"] not in (BOS_TOKEN, EOS_TOKEN)
    )


# --------------------------------------------------------------------------------------
# CLIP: tokenizer
# --------------------------------------------------------------------------------------


class CLIPTokenizer:
    """CLIP byte-level BPE with BOS/EOS packing to a fixed length.

    Args:
        vocab: token -> id.
        merges: merge rules, best (lowest rank) first.
        pad_token: token whose id fills the tail. ``None`` means ``<|endoftext|>``
            (CLIP-L in SD3). SD3's CLIP-G pads with ``"!"``, which is id 0 in OpenAI's vocabulary.
        pad_id: the pad as an id instead of a token, as KerasHub's CLIP-G tokenizer has it
            (``pad_token_id = 0``, whatever token 0 is). Give at most one of the two.
        extra_special_tokens: tokens that, like BOS and EOS, are cut out of the raw text
            before normalisation and map straight to their id. KerasHub and Stability's
            code use none; diffusers' CLIP-G tokenizer registers its pad token ``"!"``
            as special, so ``"hi!"`` ends in id 0 there instead of the id of ``"!</w>"``.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        pad_token: str | None = None,
        pad_id: int | None = None,
        extra_special_tokens: Sequence[str] = (),
        vocab_name: str = "vocabulary",
        merges_name: str = "merges",
    ):
        self.vocab = dict(vocab)
        for token in (BOS_TOKEN, EOS_TOKEN, *extra_special_tokens):
            if token not in self.vocab:
                raise TokenizerFileError(f"{vocab_name}: special token {token!r} is missing")
        self.bos_id = self.vocab[BOS_TOKEN]
        self.eos_id = self.vocab[EOS_TOKEN]
        # HF and KerasHub both map a symbol missing from the vocabulary to <|endoftext|>.
        self.unk_id = self.eos_id
        self.pad_id = self._resolve_pad(pad_token, pad_id, vocab_name)

        self.merge_ranks: dict[tuple[str, str], int] = {}
        for rank, (a, b) in enumerate(merges):
            for symbol in (a, b, a + b):
                if symbol not in self.vocab:
                    raise TokenizerFileError(
                        f"{merges_name}: merge rule {rank + 1} '{a} {b}' uses {symbol!r}, "
                        f"which is not in {vocab_name}"
                    )
            # A repeated rule keeps its last rank, like the dict built by `tokenizers`.
            self.merge_ranks[(a, b)] = rank

        # Longest first: `tokenizers` finds added tokens leftmost-longest.
        self._special = sorted({BOS_TOKEN, EOS_TOKEN, *extra_special_tokens}, key=len, reverse=True)
        self._bpe_cache: dict[str, tuple[int, ...]] = {}

    def _resolve_pad(self, pad_token: str | None, pad_id: int | None, vocab_name: str) -> int:
        if pad_token is not None and pad_id is not None:
            raise ValueError("give pad_token or pad_id, not both")
        if pad_id is not None:
            if not 0 <= pad_id <= max(self.vocab.values()):
                raise ValueError(f"pad_id {pad_id} is outside the vocabulary of {vocab_name}")
            return pad_id
        pad_token = EOS_TOKEN if pad_token is None else pad_token
        if pad_token not in self.vocab:
            raise TokenizerFileError(f"{vocab_name}: pad token {pad_token!r} is missing")
        return self.vocab[pad_token]

    # ---- construction -----------------------------------------------------------------

    @classmethod
    def from_files(cls, vocab_path: str, merges_path: str, **kwargs) -> "CLIPTokenizer":
        """KerasHub ``vocabulary.json`` or HF ``vocab.json``, plus ``merges.txt``."""
        vocab = _check_vocab(_read_json(vocab_path), vocab_path)
        merges = _read_merges(merges_path)
        return cls(vocab, merges, vocab_name=vocab_path, merges_name=merges_path, **kwargs)

    @classmethod
    def from_tokenizer_json(cls, path: str, **kwargs) -> "CLIPTokenizer":
        """An HF ``tokenizer.json`` (``tokenizers`` format, BPE model)."""
        data = _read_json(path)
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE":
            raise TokenizerFileError(f"{path}: expected a 'tokenizers' JSON with a BPE model")
        vocab = _check_vocab(model.get("vocab"), path)
        raw = model.get("merges")
        if not isinstance(raw, list):
            raise TokenizerFileError(f"{path}: model.merges is missing or not a list")
        # Older files store "a b" strings, newer ones ["a", "b"] pairs.
        lines = [m if isinstance(m, str) else " ".join(map(str, m)) for m in raw]
        merges = _parse_merges(lines, path)
        if not {"pad_token", "pad_id"} & kwargs.keys() and isinstance(data.get("padding"), dict):
            kwargs["pad_token"] = data["padding"].get("pad_token")
        if "extra_special_tokens" not in kwargs and isinstance(data.get("added_tokens"), list):
            kwargs["extra_special_tokens"] = _special_added_tokens(data["added_tokens"])
        return cls(vocab, merges, vocab_name=path, merges_name=path, **kwargs)

    @classmethod
    def from_dir(cls, directory: str, **kwargs) -> "CLIPTokenizer":
        """A KerasHub asset folder, an HF tokenizer folder, or a folder with ``tokenizer.json``.

        For HF folders the pad token and the extra special tokens come from
        ``special_tokens_map.json`` / ``tokenizer_config.json`` when present (so SD3's
        ``tokenizer_2`` behaves as in diffusers); keyword arguments override them.
        """
        if not os.path.isdir(directory):
            raise TokenizerFileError(f"{directory}: no such folder" if not os.path.exists(directory) else
                                     f"{directory}: not a folder (a CLIP tokenizer is a folder of vocabulary and merges)")
        defaults = _hf_folder_defaults(directory)
        if "pad_id" in kwargs:
            defaults.pop("pad_token", None)
        kwargs = {**defaults, **kwargs}
        merges = os.path.join(directory, "merges.txt")
        for vocab_name in ("vocabulary.json", "vocab.json"):
            vocab = os.path.join(directory, vocab_name)
            if os.path.isfile(vocab):
                return cls.from_files(vocab, merges, **kwargs)
        tokenizer_json = os.path.join(directory, "tokenizer.json")
        if os.path.isfile(tokenizer_json):
            return cls.from_tokenizer_json(tokenizer_json, **kwargs)
        raise TokenizerFileError(
            f"{directory}: no vocabulary.json, vocab.json or tokenizer.json (with merges.txt) found"
        )

    # ---- BPE ----------------------------------------------------------------------------

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-token: byte-level symbols, "</w>" on the last, merged by rank."""
        cached = self._bpe_cache.get(word)
        if cached is not None:
            return cached
        symbols = [_BYTE_TO_CHAR[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        while len(symbols) > 1:
            # Lowest rank wins; among equal pairs the leftmost, as in `tokenizers`' queue.
            ranks = [self.merge_ranks.get(pair) for pair in zip(symbols, symbols[1:])]
            candidates = [(r, i) for i, r in enumerate(ranks) if r is not None]
            if not candidates:
                break
            _, i = min(candidates)
            symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
        # Only single symbols can be unknown: merge results are checked at load time.
        ids = tuple(self.vocab.get(s, self.unk_id) for s in symbols)
        self._bpe_cache[word] = ids
        return ids

    def _split_special(self, text: str) -> list[tuple[bool, str]]:
        """Cut special tokens out of raw text, leftmost-longest: [(is_special, part), ...]."""
        parts = []
        start = i = 0
        while i < len(text):
            token = next((t for t in self._special if text.startswith(t, i)), None)
            if token is None:
                i += 1
                continue
            if start < i:
                parts.append((False, text[start:i]))
            parts.append((True, token))
            i = start = i + len(token)
        if start < len(text):
            parts.append((False, text[start:]))
        return parts

    def tokenize(self, text: str) -> list[int]:
        """Content ids of one prompt: no BOS/EOS, no truncation."""
        ids: list[int] = []
        for is_special, part in self._split_special(text):
            if is_special:
                ids.append(self.vocab[part])
                continue
            for word in _pre_tokenize(normalize_clip_text(part)):
                ids.extend(self._bpe(word))
        return ids

    # ---- packing ------------------------------------------------------------------------

    def encode(self, texts: str | Sequence[str], length: int = CLIP_SEQUENCE_LENGTH, *, return_truncated: bool = False):
        """``[BOS, content[:length-2], EOS, pad...]`` for each prompt -> int32 (B, length).

        With ``return_truncated=True`` also returns a bool (B,) array: which prompts lost
        content tokens (``pipeline.tokenize`` warns about them; KerasHub truncates silently, diffusers warns).
        """
        if length < 2:
            raise ValueError(f"length must be >= 2 to hold BOS and EOS, got {length}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.full((len(texts), length), self.pad_id, dtype=np.int32)
        truncated = np.zeros(len(texts), dtype=bool)
        for row, text in enumerate(texts):
            content = self.tokenize(text)
            truncated[row] = len(content) > length - 2
            ids = [self.bos_id, *content[: length - 2], self.eos_id]
            out[row, : len(ids)] = ids
        return (out, truncated) if return_truncated else out


# --------------------------------------------------------------------------------------
# T5
# --------------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # a negative int32 is sent as its 64-bit two's complement
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, value) -> bytes:
    """One protobuf field: bool / int as a varint, float as 32 bits, str / bytes length-delimited."""
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, int):
        return _varint(number << 3) + _varint(int(value))
    value = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _components(entry, kind: str, path: str) -> list:
    """A tokenizers normalizer / pre-tokenizer as the flat list of its steps."""
    if entry is None:
        return []
    if not isinstance(entry, dict):
        raise TokenizerFileError(f"{path}: {kind} is not a JSON object")
    if entry.get("type") == "Sequence":
        steps = entry.get("normalizers" if kind == "normalizer" else "pretokenizers")
        if not isinstance(steps, list):
            raise TokenizerFileError(f"{path}: {kind} Sequence without its list of steps")
        return [c for step in steps for c in _components(step, kind, path)]
    return [entry]


_PIECE_NORMAL, _PIECE_UNKNOWN, _PIECE_CONTROL, _PIECE_USER, _PIECE_BYTE = 1, 2, 3, 4, 6
# Normaliser Replace steps (pattern, content) by which transformers' converters spell SentencePiece's
# remove_extra_whitespaces: runs of spaces to one (4.2x: " ", 4.3x-4.5x: "▁"), strip both ends (5.x)
_REMOVE_EXTRA_WHITESPACE = {(json.dumps({"Regex": " {2,}"}), " "), (json.dumps({"Regex": " {2,}"}), "\u2581"),
                            (json.dumps({"Regex": "\\A +| +\\z"}), "")}


def sentencepiece_model_from_tokenizer_json(data, path: str = "tokenizer.json") -> bytes:
    """The serialized SentencePiece ``ModelProto`` that an HF ``tokenizer.json`` (a Unigram model, as
    transformers converts T5's ``spiece.model``) was made from: the pieces with their scores, the
    precompiled normalisation map copied byte for byte, and the whitespace options its steps stand for
    (``Metaspace`` → add the dummy prefix and escape spaces as "▁"; ``WhitespaceSplit`` or ``Replace``
    of runs of spaces → remove extra whitespace). Special added tokens (``</s>``, ``<pad>``,
    ``<extra_id_N>``) become control pieces, which SentencePiece never matches in text, as in the
    original model (HF matches their text: docs/tokenizers.md); other added tokens become user-defined
    pieces. A step with no SentencePiece equivalent is refused, naming it."""
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "Unigram":
        kind = model.get("type") if isinstance(model, dict) else None
        raise TokenizerFileError(f"{path}: expected a 'tokenizers' JSON with a Unigram model (T5's), got {kind!r}")
    vocab = model.get("vocab")
    if not isinstance(vocab, list) or not vocab or not all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0]
            and isinstance(v[1], (int, float)) and not isinstance(v[1], bool) for v in vocab):
        raise TokenizerFileError(f"{path}: model.vocab must be a non-empty list of [piece, score] pairs")
    unk_id = model.get("unk_id")
    if not isinstance(unk_id, int) or isinstance(unk_id, bool) or not 0 <= unk_id < len(vocab):
        raise TokenizerFileError(f"{path}: model.unk_id {unk_id!r} is not an id of model.vocab "
                                 "(SentencePiece needs an unknown piece)")
    byte_fallback = model.get("byte_fallback") is True
    added, vocab = {}, list(vocab)
    entries = data.get("added_tokens") or []
    if not all(isinstance(e, dict) and isinstance(e.get("id"), int) and isinstance(e.get("content"), str)
               for e in entries):
        raise TokenizerFileError(f"{path}: an added_tokens entry without an integer id and a content string")
    for entry in sorted(entries, key=lambda e: e["id"]):
        if entry["id"] == len(vocab):  # added after the model's pieces: a piece of its own, at that id
            vocab.append([entry["content"], 0.0])
        if not (0 <= entry["id"] < len(vocab) and vocab[entry["id"]][0] == entry["content"]):
            raise TokenizerFileError(f"{path}: added token {entry['content']!r} (id {entry['id']}) is neither that "
                                     "piece of model.vocab nor the next id after it")
        added[entry["id"]] = entry

    charsmap, remove_extra, dummy_prefix, escape = b"", False, False, False
    for step in _components(data.get("normalizer"), "normalizer", path):
        kind, replace = step.get("type"), (json.dumps(step.get("pattern")), step.get("content"))
        if kind == "Precompiled":
            try:
                charsmap = base64.b64decode(step.get("precompiled_charsmap") or "", validate=True)
            except (ValueError, TypeError) as e:
                raise TokenizerFileError(f"{path}: precompiled_charsmap is not base64 ({e})") from None
        elif kind == "Strip" or (kind == "Replace" and replace in _REMOVE_EXTRA_WHITESPACE):
            remove_extra = True  # transformers' spellings of SentencePiece's whitespace removal
        elif kind == "Replace" and replace == (json.dumps({"String": " "}), "\u2581"):
            escape = True  # spaces escaped in the normaliser rather than by Metaspace
        elif kind == "Replace" and replace == (json.dumps({"Regex": "\\A\u2581"}), "\u2581\u2581"):
            pass  # keeps Metaspace from eating a leading "▁" as the dummy prefix: SentencePiece never does
        else:
            raise TokenizerFileError(f"{path}: normalizer step {kind!r} has no SentencePiece equivalent")
    for step in _components(data.get("pre_tokenizer"), "pre_tokenizer", path):
        kind = step.get("type")
        if kind == "WhitespaceSplit":
            remove_extra = True
        elif kind == "Metaspace" and step.get("replacement") == "\u2581":
            escape = True
            scheme = step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never")
            dummy_prefix = scheme != "never"
        else:
            raise TokenizerFileError(f"{path}: pre_tokenizer step {kind!r} has no SentencePiece equivalent")
    if not escape:
        raise TokenizerFileError(f"{path}: spaces are not replaced by '\u2581' (no Metaspace): not a SentencePiece "
                                 "tokenizer")

    def piece_type(i, piece):
        if i == unk_id:
            return _PIECE_UNKNOWN
        if i in added:
            return _PIECE_CONTROL if added[i].get("special") else _PIECE_USER
        if byte_fallback and re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            return _PIECE_BYTE
        return _PIECE_NORMAL

    pieces = b"".join(_field(1, _field(1, piece) + _field(2, float(score)) + _field(3, piece_type(i, piece)))
                      for i, (piece, score) in enumerate(vocab))
    ids = {piece: i for i, (piece, _) in enumerate(vocab)}
    trainer = (_field(3, 1) + _field(4, len(vocab)) + _field(35, byte_fallback) + _field(40, unk_id)  # 1: unigram
               + b"".join(_field(n, ids.get(piece, -1)) for n, piece in ((41, "<s>"), (42, "</s>"), (43, "<pad>"))))
    normalizer = _field(2, charsmap) + _field(3, dummy_prefix) + _field(4, remove_extra) + _field(5, escape)
    return pieces + _field(2, trainer) + _field(3, normalizer)


class T5Tokenizer:
    """SentencePiece tokenizer packed as ``[content[:length-1], EOS, pad...]`` (no BOS).

    EOS is ``</s>`` and pad is ``<pad>`` (ids 1 and 0 in T5's ``spiece.model``).
    """

    def __init__(self, model_proto: bytes, *, name: str = "SentencePiece model"):
        import sentencepiece

        self.name = name
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        except (RuntimeError, OSError, TypeError) as e:
            raise TokenizerFileError(f"{name}: not a valid SentencePiece model ({e})") from None
        self.eos_id = self._piece_id("</s>")
        self.pad_id = self._piece_id("<pad>")

    def _piece_id(self, piece: str) -> int:
        # piece_to_id answers unk for unknown pieces; the round trip tells them apart.
        idx = self.sp.piece_to_id(piece)
        if self.sp.id_to_piece(idx) != piece:
            raise TokenizerFileError(f"{self.name}: piece {piece!r} is missing")
        return idx

    @classmethod
    def from_file(cls, path: str) -> "T5Tokenizer":
        """``spiece.model`` (HF), ``vocabulary.spm`` (KerasHub) or an HF ``tokenizer.json`` (``.json``)."""
        if path.endswith(".json"):
            return cls(sentencepiece_model_from_tokenizer_json(_read_json(path), path), name=path)
        try:
            with open(path, "rb") as f:
                proto = f.read()
        except FileNotFoundError:
            raise TokenizerFileError(f"{path}: file not found") from None
        except OSError as e:
            raise TokenizerFileError(f"{path}: cannot read ({e})") from None
        return cls(proto, name=path)

    def tokenize(self, text: str) -> list[int]:
        """Content ids of one prompt, without EOS."""
        return list(self.sp.encode(text))

    def encode(self, texts: str | Sequence[str], length: int | None = 256, *, return_truncated: bool = False):
        """-> int32 (B, L). ``length=None`` pads to max(77, longest prompt + EOS), as
        Stability's SD3 code does; KerasHub uses 256 (diffusers' default too)."""
        if length is not None and length < 1:
            raise ValueError(f"length must be >= 1 to hold EOS, got {length}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        contents = [self.tokenize(t) for t in texts]
        if length is None:
            length = max([CLIP_SEQUENCE_LENGTH, *(len(c) + 1 for c in contents)])
        out = np.full((len(texts), length), self.pad_id, dtype=np.int32)
        truncated = np.zeros(len(texts), dtype=bool)
        for row, content in enumerate(contents):
            # EOS stays last after truncation, as with HF's truncation=True.
            truncated[row] = len(content) > length - 1
            ids = [*content[: length - 1], self.eos_id]
            out[row, : len(ids)] = ids
        return (out, truncated) if return_truncated else out
