"""sd3ref.tokenizers: parity with the recorded framework ids, properties, bad files.

The parity ids come from golden/tokenizers/corpus.json (written by golden/tokenizer_corpus.py in
the golden environment); no framework is needed here.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sd3ref.tokenizers import (
    CLIPTokenizer,
    T5Tokenizer,
    TokenizerFileError,
    bytes_to_unicode,
    normalize_clip_text,
)

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "tokenizers"
CORPUS_PATH = GOLDEN / "corpus.json"
# What transformers 5 saved of the same T5 tokenizer (golden.diffusers_side: the diffusers pipeline's
# tokenizer_3, T5Tokenizer.from_pretrained(the folder of spiece.model, extra_ids=0)): tokenizer.json only.
T5_TOKENIZER_JSON = GOLDEN.parent / "sd3" / "diffusers" / "tokenizer_3" / "tokenizer.json"


# --------------------------------------------------------------------------------------
# Parity with the frameworks
# --------------------------------------------------------------------------------------


def _load_corpus():
    if not CORPUS_PATH.is_file():
        pytest.skip(f"{CORPUS_PATH} not generated yet (python -m golden.generate)")
    with open(CORPUS_PATH, encoding="utf-8") as f:
        return json.load(f)


def _expand(packed: dict) -> list[int]:
    return packed["head"] + [packed["pad"]] * (packed["length"] - len(packed["head"]))


def _clip_for_setting(setting: str, vocab: str, merges: str) -> CLIPTokenizer:
    if setting.endswith("clip_l"):
        return CLIPTokenizer.from_files(vocab, merges)  # pads with EOS
    if setting == "hf_clip_g":
        # diffusers' tokenizer_2: pad "!" that is also a special token cut out of the text.
        return CLIPTokenizer.from_files(vocab, merges, pad_token="!", extra_special_tokens=("!",))
    return CLIPTokenizer.from_files(vocab, merges, pad_id=0)  # KerasHub CLIP-G


def _check_entries(entries, texts, tokenizer, setting, length, content_key, skip_pair=None):
    mismatches = []
    for text, entry in zip(texts, entries):
        if skip_pair is not None and skip_pair in entry["disagreements"]:
            continue
        ours, truncated = tokenizer.encode(text, length, return_truncated=True)
        expected = _expand(entry["ids"][setting])
        if ours[0].tolist() != expected:
            mismatches.append(repr(text))
        elif bool(truncated[0]) != (entry["content_len"][content_key] > length - (2 if content_key == "clip" else 1)):
            mismatches.append(f"{text!r} (truncation flag)")
    assert not mismatches, f"{setting}: {len(mismatches)} mismatches, e.g. {mismatches[:5]}"


CLIP_SETTINGS = ["hf_clip_l", "hf_clip_g", "keras_clip_l", "keras_clip_g"]


@pytest.mark.parametrize("setting", CLIP_SETTINGS)
def test_clip_matches_frameworks(setting):
    corpus = _load_corpus()
    tokenizer = _clip_for_setting(setting, str(GOLDEN / "clip" / "vocab.json"), str(GOLDEN / "clip" / "merges.txt"))
    entries = corpus["entries"]
    _check_entries(entries, [e["text"] for e in entries], tokenizer, setting, 77, "clip")


@pytest.mark.parametrize("source", [GOLDEN / "t5" / "spiece.model", T5_TOKENIZER_JSON], ids=["spiece", "tokenizer_json"])
@pytest.mark.parametrize("setting", ["keras_t5_256", "keras_t5_77", "hf_t5_256", "hf_t5_77"])
def test_t5_matches_frameworks(setting, source):
    """Exact for KerasHub (the sentencepiece library). HF's tokenizers-based T5 differs on a few
    documented inputs (special-token text such as "</s>", U+0085); those entries are skipped.
    The tokenizer.json is rebuilt into the SentencePiece model, so it matches KerasHub exactly too."""
    corpus = _load_corpus()
    tokenizer = T5Tokenizer.from_file(str(source))
    length = int(setting.rsplit("_", 1)[1])
    skip_pair = f"{setting} vs keras_{setting[3:]}" if setting.startswith("hf_") else None
    entries = corpus["entries"]
    _check_entries(entries, [e["text"] for e in entries], tokenizer, setting, length, "t5", skip_pair)


def test_corpus_hf_t5_differences_are_the_documented_kinds():
    """Every HF-vs-KerasHub T5 disagreement involves text HF treats differently: a special
    token's text or U+0085, which HF splits on as whitespace and SentencePiece does not."""
    corpus = _load_corpus()
    for entry in corpus["entries"]:
        if any("t5" in pair for pair in entry["disagreements"]):
            assert any(s in entry["text"] for s in ("</s>", "<pad>", "<unk>", "\x85")), repr(entry["text"])


def test_corpus_files_are_the_golden_files():
    import hashlib

    corpus = _load_corpus()
    for name, digest in corpus["files"].items():
        assert hashlib.sha256((GOLDEN / name).read_bytes()).hexdigest() == digest, name


@pytest.fixture(scope="module")
def real_clip_dir(tmp_path_factory):
    """OpenAI's 49,408-token CLIP vocabulary (vocab.json + merges.txt), built from the committed
    golden/tokenizers/clip_real/bpe_simple_vocab_16e6.txt.gz as the corpus generator built it: the same
    files, checked by their hashes in the corpus."""
    from golden.tokenizer_corpus import REAL_BPE, write_real_clip_vocab

    corpus = _load_corpus()
    if corpus.get("real_clip") is None:
        pytest.skip("corpus.json has no real-vocabulary ids (python -m golden.generate)")
    d = tmp_path_factory.mktemp("clip_real")
    write_real_clip_vocab(REAL_BPE, str(d))
    import hashlib

    for name, digest in corpus["real_clip"]["files"].items():
        assert hashlib.sha256((d / name).read_bytes()).hexdigest() == digest, name
    return d


@pytest.mark.parametrize("setting", CLIP_SETTINGS)
def test_clip_matches_frameworks_on_real_vocabulary(setting, real_clip_dir):
    """The same corpus on OpenAI's real vocabulary: HF's and KerasHub's ids (corpus.json, "real_clip")."""
    corpus = _load_corpus()
    tokenizer = _clip_for_setting(setting, str(real_clip_dir / "vocab.json"), str(real_clip_dir / "merges.txt"))
    texts = [e["text"] for e in corpus["entries"]]
    _check_entries(corpus["real_clip"]["entries"], texts, tokenizer, setting, 77, "clip")


# --------------------------------------------------------------------------------------
# A self-made vocabulary for properties and unit tests (no golden files needed)
# --------------------------------------------------------------------------------------

BASE = list(bytes_to_unicode().values())
TOY_MERGES = [("c", "a"), ("ca", "t</w>"), ("t", "h"), ("th", "e</w>"), ("o", "f</w>")]


def _toy_files(tmp_path: Path, merges=TOY_MERGES) -> tuple[str, str]:
    tokens = BASE + [s + "</w>" for s in BASE]
    tokens += ["".join(m) for m in merges if "".join(m) not in tokens]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab, merges_txt = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    merges_txt.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return str(vocab), str(merges_txt)


@pytest.fixture(scope="module")
def toy_clip(tmp_path_factory):
    return CLIPTokenizer.from_files(*_toy_files(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def toy_t5():
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["a photo of a cat", "the quick brown fox", "a red cube on a table"] * 4),
        model_writer=model, vocab_size=40, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
        bos_id=-1, hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    return T5Tokenizer(model.getvalue())


def test_toy_clip_examples(toy_clip):
    v = toy_clip.vocab
    assert toy_clip.tokenize("The CAT of") == [v["the</w>"], v["cat</w>"], v["of</w>"]]
    # digits one by one; contractions split off; special tokens kept whole
    assert toy_clip.tokenize("42") == [v["4</w>"], v["2</w>"]]
    assert toy_clip.tokenize("it's") == [v["i"], v["t</w>"], v["'"], v["s</w>"]]
    assert toy_clip.tokenize("a<|endoftext|>") == [v["a</w>"], toy_clip.eos_id]
    # an upper-case special token is normalised into text, then cut as "<|", "endoftext", "|>"
    assert toy_clip.tokenize("<|ENDOFTEXT|>")[:2] == [v["<"], v["|</w>"]]
    # padding: CLIP-L style with EOS, CLIP-G style with id 0
    ids = toy_clip.encode(["cat", ""])
    assert ids.dtype == np.int32 and ids.shape == (2, 77)
    assert ids[0, :3].tolist() == [toy_clip.bos_id, v["cat</w>"], toy_clip.eos_id]
    assert (ids[1, 1:] == toy_clip.eos_id).all()


def test_toy_clip_pad_options(tmp_path):
    vocab, merges = _toy_files(tmp_path)
    g = CLIPTokenizer.from_files(vocab, merges, pad_id=0)
    assert g.encode("")[0].tolist() == [g.bos_id, g.eos_id] + [0] * 75
    hf_g = CLIPTokenizer.from_files(vocab, merges, pad_token="!", extra_special_tokens=("!",))
    plain = CLIPTokenizer.from_files(vocab, merges, pad_token="!")
    assert hf_g.tokenize("a!") == [hf_g.vocab["a</w>"], hf_g.vocab["!"]]
    assert plain.tokenize("a!") == [plain.vocab["a</w>"], plain.vocab["!</w>"]]
    with pytest.raises(ValueError):
        CLIPTokenizer.from_files(vocab, merges, pad_id=0, pad_token="!")


def test_from_dir_reads_hf_folder_defaults(tmp_path):
    vocab, merges = _toy_files(tmp_path)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"added_tokens_decoder": {"0": {"content": "!", "special": True}}})
    )
    tok = CLIPTokenizer.from_dir(str(tmp_path))
    assert tok.pad_id == tok.vocab["!"]
    assert tok.tokenize("a!")[-1] == tok.vocab["!"]


def test_from_tokenizer_json_matches_files(tmp_path):
    vocab, merges = _toy_files(tmp_path)
    data = {
        "added_tokens": [{"content": "<|endoftext|>", "special": True}],
        "padding": None,
        "model": {"type": "BPE", "vocab": json.loads(Path(vocab).read_text()), "merges": [list(m) for m in TOY_MERGES]},
    }
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    a, b = CLIPTokenizer.from_tokenizer_json(str(path)), CLIPTokenizer.from_files(vocab, merges)
    text = "the cat of cats, it's 2024!"
    assert a.encode(text).tolist() == b.encode(text).tolist()


def test_bpe_prefers_lowest_rank_then_leftmost(tmp_path):
    # "aaa</w>": (a, a) is the best rule; the leftmost pair merges first -> "aa", "a</w>".
    vocab, merges = _toy_files(tmp_path, merges=[("a", "a"), ("a", "a</w>")])
    tok = CLIPTokenizer.from_files(vocab, merges)
    assert tok.tokenize("aaa") == [tok.vocab["aa"], tok.vocab["a</w>"]]


def test_unknown_symbol_maps_to_endoftext(tmp_path):
    vocab, merges = _toy_files(tmp_path)
    data = json.loads(Path(vocab).read_text())
    del data["z</w>"]
    Path(vocab).write_text(json.dumps(data))
    tok = CLIPTokenizer.from_files(vocab, merges)
    assert tok.tokenize("z") == [tok.eos_id]


def test_normalisation_rules():
    assert normalize_clip_text("ΟΔΟΣ") == "οδοσ"  # per-character lowercase, no final sigma
    assert normalize_clip_text("cafe\u0301") == "café"  # NFC
    assert normalize_clip_text("a \t\n\u3000b\x1cc") == "a b\x1cc"  # Unicode White_Space only
    assert normalize_clip_text("İ") == "i\u0307"


# ---- properties ------------------------------------------------------------------------

# Prompts built from fragments that hit the rules (specials, contractions, digits, spaces)
# mixed with arbitrary characters; long enough to need truncation now and then.
texts = st.lists(
    st.one_of(
        st.sampled_from(list("abcthe !?'.,0123456789") + ["'s", "<|endoftext|>", "<|startoftext|>", "\t", "\n"]),
        st.characters(blacklist_categories=("Cs",)),
    ),
    max_size=120,
).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=texts)
def test_clip_packing_properties(toy_clip, text):
    content = toy_clip.tokenize(text)
    ids, truncated = toy_clip.encode(text, return_truncated=True)
    row = ids[0].tolist()
    kept = min(len(content), 75)
    assert len(row) == 77
    assert row[0] == toy_clip.bos_id
    assert row[1 : 1 + kept] == content[:kept]  # truncation keeps the first 75 content tokens
    assert row[1 + kept] == toy_clip.eos_id
    assert row[2 + kept :] == [toy_clip.pad_id] * (75 - kept)  # pad after EOS
    assert bool(truncated[0]) == (len(content) > 75)


@settings(max_examples=100, deadline=None)
@given(batch=st.lists(texts, min_size=1, max_size=4))
def test_clip_batch_rows_are_independent(toy_clip, batch):
    together = toy_clip.encode(batch)
    assert together.shape == (len(batch), 77)
    for row, text in zip(together, batch):
        assert row.tolist() == toy_clip.encode(text)[0].tolist()


@settings(max_examples=300, deadline=None)
@given(text=texts)
def test_normalisation_is_idempotent(text):
    """Except where lowercasing makes a sequence that NFC would now change (as in HF):
    "İ" -> "i" + U+0307 before a lower-class mark, or a capital Greek vowel with tonos +
    U+0345 whose small form composes. An exhaustive scan finds no other code point."""
    once = normalize_clip_text(text)
    if "\u0130" in text or "\u0345" in text:
        return
    assert normalize_clip_text(once) == once


@settings(max_examples=100, deadline=None)
@given(text=texts, length=st.sampled_from([1, 2, 8, 77, 256]))
def test_t5_packing_properties(toy_t5, text, length):
    content = toy_t5.tokenize(text)
    ids, truncated = toy_t5.encode(text, length, return_truncated=True)
    row = ids[0].tolist()
    kept = min(len(content), length - 1)
    assert len(row) == length
    assert row[:kept] == content[:kept]
    assert row[kept] == toy_t5.eos_id == 1  # EOS stays last after truncation
    assert row[kept + 1 :] == [0] * (length - kept - 1)
    assert bool(truncated[0]) == (len(content) > length - 1)


def test_t5_length_none_pads_to_at_least_77(toy_t5):
    assert toy_t5.encode("a cat", None).shape == (1, 77)
    long = " ".join(["quick"] * 100)
    assert toy_t5.encode([long, "a"], None).shape == (2, len(toy_t5.tokenize(long)) + 1)


# ---- bad files ---------------------------------------------------------------------------


def _one_line_naming(excinfo, path) -> None:
    message = str(excinfo.value)
    assert "\n" not in message and str(path) in message, message


def test_missing_files(tmp_path):
    vocab, merges = _toy_files(tmp_path)
    for args, missing in (((str(tmp_path / "nope.json"), merges), "nope.json"), ((vocab, str(tmp_path / "nope.txt")), "nope.txt")):
        with pytest.raises(TokenizerFileError) as e:
            CLIPTokenizer.from_files(*args)
        _one_line_naming(e, tmp_path / missing)
    with pytest.raises(TokenizerFileError) as e:
        T5Tokenizer.from_file(str(tmp_path / "spiece.model"))
    _one_line_naming(e, tmp_path / "spiece.model")
    with pytest.raises(TokenizerFileError) as e:
        CLIPTokenizer.from_dir(str(tmp_path / "empty"))
    _one_line_naming(e, tmp_path / "empty")


@pytest.mark.parametrize(
    "vocab_text",
    ['{"a": 0', "[1, 2]", "{}", '{"a": "zero"}'],
)
def test_malformed_vocabulary(tmp_path, vocab_text):
    _, merges = _toy_files(tmp_path)
    bad = tmp_path / "bad_vocab.json"
    bad.write_text(vocab_text)
    with pytest.raises(TokenizerFileError) as e:
        CLIPTokenizer.from_files(str(bad), merges)
    _one_line_naming(e, bad)


@pytest.mark.parametrize("merges_text", ["a\n", "a b c\n", "\n", "q z\n"])
def test_malformed_merges(tmp_path, merges_text):
    vocab, _ = _toy_files(tmp_path)
    data = json.loads(Path(vocab).read_text())
    del data["z"]  # so "q z" names a symbol that is not in the vocabulary
    Path(vocab).write_text(json.dumps(data))
    bad = tmp_path / "bad_merges.txt"
    bad.write_text("#version: 0.2\n" + merges_text)
    with pytest.raises(TokenizerFileError) as e:
        CLIPTokenizer.from_files(vocab, str(bad))
    _one_line_naming(e, bad)


def test_vocabulary_without_special_tokens(tmp_path):
    vocab, merges = _toy_files(tmp_path)
    data = json.loads(Path(vocab).read_text())
    del data["<|endoftext|>"]
    Path(vocab).write_text(json.dumps(data))
    with pytest.raises(TokenizerFileError) as e:
        CLIPTokenizer.from_files(vocab, merges)
    _one_line_naming(e, vocab)


def test_corrupt_sentencepiece_model(tmp_path):
    bad = tmp_path / "spiece.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerFileError) as e:
        T5Tokenizer.from_file(str(bad))
    _one_line_naming(e, bad)


# ---- T5 from an HF tokenizer.json --------------------------------------------------------


@pytest.fixture(scope="module")
def t5_pair():
    """The golden SentencePiece model and the tokenizer.json transformers made of it."""
    return (T5Tokenizer.from_file(str(GOLDEN / "t5" / "spiece.model")),
            T5Tokenizer.from_file(str(T5_TOKENIZER_JSON)))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
       | st.lists(st.sampled_from(["a", " ", "  ", "\t", "\n", "\u3000", "\xa0", "ﬁ", "ｃ", "\u0301", "é",
                                   "</s>", "<pad>", "<unk>", "photo", "cat", "▁"]), max_size=12).map("".join))
def test_t5_tokenizer_json_is_the_sentencepiece_model(t5_pair, text):
    spiece, rebuilt = t5_pair
    assert rebuilt.tokenize(text) == spiece.tokenize(text)


# The whitespace steps transformers' converters wrote around the same Precompiled map: 4.2x's T5Converter,
# 4.3x-4.5x's SpmConverter (which T5Converter inherited), and 5.x's generic SpmConverter
_STRIP_RIGHT = {"type": "Strip", "strip_left": False, "strip_right": True}
_METASPACE = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
OLDER_FORMS = {
    "4.2x": ([{"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}],
             {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True}),
    "4.3x": ([_STRIP_RIGHT, {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": "\u2581"}], _METASPACE),
    "5.x spm": ([{"type": "Replace", "pattern": {"Regex": "\\A +| +\\z"}, "content": ""},
                 {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "},
                 {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
                 {"type": "Replace", "pattern": {"Regex": "\\A\u2581"}, "content": "\u2581\u2581"}],
                {"type": "Sequence", "pretokenizers": [dict(_METASPACE, split=False)]}),
}


@pytest.mark.parametrize("form", OLDER_FORMS)
def test_t5_tokenizer_json_of_other_transformers_versions(tmp_path, t5_pair, form):
    data = json.loads(T5_TOKENIZER_JSON.read_text(encoding="utf-8"))
    steps, pre_tokenizer = OLDER_FORMS[form]
    data["normalizer"] = {"type": "Sequence", "normalizers": [data["normalizer"], *steps]}
    data["pre_tokenizer"] = pre_tokenizer
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    other = T5Tokenizer.from_file(str(path))
    spiece = t5_pair[0]
    for entry in _load_corpus()["entries"]:
        assert other.tokenize(entry["text"]) == spiece.tokenize(entry["text"]), repr(entry["text"])


def test_t5_tokenizer_json_ids_and_special_pieces(tmp_path, t5_pair):
    spiece, rebuilt = t5_pair
    assert (rebuilt.eos_id, rebuilt.pad_id, rebuilt.sp.unk_id()) == (spiece.eos_id, spiece.pad_id, spiece.sp.unk_id())
    assert [rebuilt.sp.id_to_piece(i) for i in range(rebuilt.sp.get_piece_size())] == \
        [spiece.sp.id_to_piece(i) for i in range(spiece.sp.get_piece_size())]
    # A real T5 tokenizer.json lists <extra_id_N> as special added tokens at the end of the vocabulary:
    # their ids are kept, and SentencePiece never matches their text (as with spiece.model, which lacks them)
    data = json.loads(T5_TOKENIZER_JSON.read_text(encoding="utf-8"))
    n = len(data["model"]["vocab"])
    for i in range(3):
        data["model"]["vocab"].append([f"<extra_id_{2 - i}>", 0.0])
        data["added_tokens"].append({"id": n + i, "content": f"<extra_id_{2 - i}>", "special": True})
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    extra = T5Tokenizer.from_file(str(path))
    assert extra.sp.piece_to_id("<extra_id_0>") == n + 2 and extra.sp.get_piece_size() == n + 3
    assert extra.tokenize("a <extra_id_0> cat") == spiece.tokenize("a <extra_id_0> cat")
    # an added token after the model's pieces (not in model.vocab) gets its own piece at its id
    data["added_tokens"].append({"id": n + 3, "content": "<new>", "special": True})
    path.write_text(json.dumps(data), encoding="utf-8")
    assert T5Tokenizer.from_file(str(path)).sp.piece_to_id("<new>") == n + 3


@pytest.mark.parametrize("change,message", [
    (lambda d: d["model"].update(type="BPE"), "Unigram model"),
    (lambda d: d["model"].update(unk_id=None), "unk_id"),
    (lambda d: d["model"]["vocab"].append(["\u2581a", -1.0]), "already defined"),
    (lambda d: d["model"]["vocab"].append(["x"]), "pairs"),
    (lambda d: d.update(normalizer={"type": "Lowercase"}), "normalizer step 'Lowercase'"),
    (lambda d: d.update(pre_tokenizer={"type": "ByteLevel"}), "pre_tokenizer step 'ByteLevel'"),
    (lambda d: d.update(pre_tokenizer=None), "no Metaspace"),
    (lambda d: d["normalizer"].update(precompiled_charsmap="%%"), "base64"),
    (lambda d: d["added_tokens"].append({"id": 5, "content": "<nope>", "special": True}), "<nope>"),
    (lambda d: d["added_tokens"].append({"id": 999, "content": "<far>", "special": True}), "nor the next id"),
])
def test_t5_bad_tokenizer_json(tmp_path, change, message):
    data = json.loads(T5_TOKENIZER_JSON.read_text(encoding="utf-8"))
    change(data)
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=message) as e:
        T5Tokenizer.from_file(str(bad))
    _one_line_naming(e, bad)
