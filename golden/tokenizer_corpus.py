"""Tokenizer parity corpus: prompts and the ids the real frameworks give them.

Runs in the golden environment only (transformers, tokenizers, keras-hub, sentencepiece).
``build_corpus(clip_dir, spiece_path, out_path)`` writes ``golden/tokenizers/corpus.json``;
tests/test_tokenizers.py checks sd3ref's tokenizers against every entry without any framework.

Each entry stores, per framework setting (see ``SETTINGS``), the packed ids compressed as
``{"head": [...], "pad": p, "length": L}`` (ids = head + [p] * (L - len(head))), the untruncated
content length, and which framework pairs disagree. Ids come from:

* HF transformers 5 ``CLIPTokenizer`` (CLIP-L pads with EOS; CLIP-G ``pad_token="!"`` as in SD3's
  diffusers ``tokenizer_2``) and ``T5Tokenizer(extra_ids=0)``, called with
  ``padding="max_length", truncation=True`` as diffusers' SD3 pipeline calls them;
* KerasHub 0.32's ``StableDiffusion3TextToImagePreprocessor.generate_preprocess`` (the path
  ``generate()`` uses) with ``CLIPTokenizer(pad_with_end_token=True/False)`` and a 256-token
  ``T5Preprocessor``, plus a 77-token ``T5Preprocessor``. No TensorFlow: the two no-TF
  workarounds of golden/README.md are applied.

The CLIP settings are also run on the real 49,408-token OpenAI vocabulary, rebuilt from
``bpe_simple_vocab_16e6.txt.gz`` (golden/tokenizers/clip_real, or ``real_bpe_gz`` / SD3REF_CLIP_BPE_GZ),
and stored under ``"real_clip"``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import shutil
import tempfile

from golden import make_tokenizers

SEED = 20240611
CLIP_LENGTH = 77

# setting -> how the ids were produced (written into the corpus for provenance).
SETTINGS = {
    "hf_clip_l": "transformers.CLIPTokenizer.from_pretrained(dir with vocab.json, merges.txt, model_max_length=77)"
    "(texts, padding='max_length', max_length=77, truncation=True)",
    "hf_clip_g": "as hf_clip_l with pad_token='!'",
    "keras_clip_l": "keras_hub CLIPPreprocessor(CLIPTokenizer(pad_with_end_token=True), sequence_length=77, "
    "to_lower=False) via StableDiffusion3TextToImagePreprocessor.generate_preprocess",
    "keras_clip_g": "as keras_clip_l with pad_with_end_token=False",
    "hf_t5_256": "transformers.T5Tokenizer.from_pretrained(dir with spiece.model, extra_ids=0)"
    "(texts, padding='max_length', max_length=256, truncation=True)",
    "hf_t5_77": "as hf_t5_256 with max_length=77",
    "keras_t5_256": "keras_hub T5Preprocessor(T5Tokenizer(proto=spiece.model), sequence_length=256) "
    "via StableDiffusion3TextToImagePreprocessor.generate_preprocess",
    "keras_t5_77": "keras_hub T5Preprocessor(T5Tokenizer(proto=spiece.model), sequence_length=77)",
}
# Framework pairs that should agree; an entry lists the pairs that do not.
COMPARED_PAIRS = [
    ("hf_clip_l", "keras_clip_l"),
    ("hf_clip_g", "keras_clip_g"),
    ("hf_t5_256", "keras_t5_256"),
    ("hf_t5_77", "keras_t5_77"),
]


# --------------------------------------------------------------------------------------
# The prompts
# --------------------------------------------------------------------------------------

# (tag, text): hand-picked cases, each aimed at one rule of the tokenizers.
FIXED = [
    ("basic", "a photo of a cat"),
    ("basic", "an astronaut riding a horse on the moon"),
    ("basic", "portrait of an old fisherman, detailed, 35mm photograph"),
    ("basic", "a bowl of fruit: apples, pears and oranges"),
    ("empty", ""),
    ("whitespace", " "),
    ("whitespace", "\t\n \r\n"),
    ("case", "A PHOTO Of A CAT"),
    ("case", "ΟΔΟΣ ΣΑΣ σας"),  # capital sigma lowercases to σ (never final ς) in HF
    ("case", "İstanbul"),  # U+0130 lowercases to two code points
    ("case", "ǅemal ǄEMAL ẞtraße"),
    ("case", "\u0386\u0345 \u038f\u0345"),  # lowercasing makes a sequence NFC would compose
    ("accents", "über café -- naïve résumé"),
    ("accents", "cafe\u0301 nai\u0308ve"),  # NFD input, NFC composes it
    ("accents", "\u0301a"),  # leading combining mark
    ("accents", "A\u0130\u0316"),  # lowercasing leaves non-canonical mark order
    ("ligature", "ﬁne ﬃ ﬂower"),  # NFC keeps ligatures, T5's NFKC does not
    ("cjk", "日本語のテキスト 東京タワー"),
    ("cjk", "中文，标点。全角！"),
    ("hangul", "한국어 문장입니다"),
    ("emoji", "emoji 🐱🚀 👍🏽 👨‍👩‍👧 ❤️ 🇯🇵"),
    ("digits", "2024"),
    ("digits", "100%"),
    ("digits", "3.14159 1,000,000 0x1F 007"),
    ("digits", "Ⅻ ½ ² ٣٤ ४२ ①"),
    ("punct", "a.b,c;d:e?f!g"),
    ("punct", "hello! hi!! !!! ?!?!"),
    ("punct", "(parentheses) [brackets] {braces} <angle>"),
    ("punct", "\"double\" 'single' «guillemets» — dash … ellipsis"),
    ("punct", "--- ... ___ *** ### @@@ $$$ ^^^ ~~~ |||"),
    ("contractions", "it's a dog's life!!"),
    ("contractions", "don't WON'T you'll i'd we've they're I'M"),
    ("contractions", "''s 's's 'S 'x rock'n'roll"),
    ("contractions", "it’s curly’s"),
    ("spaces", "a  b   c"),
    ("spaces", "a\tb\nc\r\nd\x0be\x0cf"),
    ("spaces", "   leading and trailing   "),
    ("spaces", "nbsp\u00a0thin\u2009ideographic\u3000narrow\u202fline\u2028para\u2029nel\u0085end"),
    ("spaces", "zero\u200bwidth\ufeffbom\u180emongolian"),  # not whitespace for Oniguruma
    ("spaces", "file\x1cgroup\x1drecord\x1eunit\x1fsep"),  # Python isspace() says yes, HF says no
    ("specials", "<|startoftext|>"),
    ("specials", "<|endoftext|>"),
    ("specials", "x <|endoftext|> y"),
    ("specials", "<|startoftext|>a cat<|endoftext|>"),
    ("specials", "<|EndOfText|> <|STARTOFTEXT|>"),
    ("specials", "<|startoftext|<|endoftext|>>"),
    ("specials", "</w> a</w>b"),
    ("specials", "</s> <pad> <unk> a</s>b"),
    ("control", "nul\x00bell\x07del\x7f"),
    ("mixed", "A Photo of 2 Cats & 3 Dogs, it's 100% ÜBER-cute!!! 🐶🐱"),
]


def _long_prompts() -> list[tuple[str, str]]:
    """Prompts around and beyond the truncation points (75 CLIP / 76 or 255 T5 content tokens)."""
    out = []
    # One word per CLIP token in the tiny vocabulary ("a</w>" is a base symbol).
    for n in (74, 75, 76, 77, 100):
        out.append(("long", " ".join(["a"] * n)))
    for n in (254, 255, 256, 300):
        out.append(("long", " ".join(["a"] * n)))
    out.append(
        (
            "long",
            "a highly detailed matte painting of a sprawling futuristic city at dusk, neon lights "
            "reflecting on wet streets, flying cars, towering skyscrapers with holographic billboards, "
            "crowds of people in raincoats, volumetric fog, cinematic lighting, ultra wide angle, "
            "8k resolution, trending on artstation, by greg rutkowski and syd mead, octane render, "
            "sharp focus, intricate details, award winning photograph, 35mm film grain",
        )
    )
    out.append(("long", "word " * 200 + "end"))
    out.append(("long", "1234567890" * 12))
    return out


# Fragments the random prompts are drawn from.
_FRAGMENTS = [
    "a", "photo", "of", "the", "cat", "Dog", "HORSE", "moon", "city", "neon", "rain",
    "über", "café", "naïve", "Ærø", "straße", "ﬁne", "İ", "Σ", "ΟΔΟΣ", "東京", "猫", "한국", "тест",
    "مرحبا", "שלום", "🐱", "🚀", "👍🏽", "❤️", "2024", "7", "3.5", "100%", "1,000", "½", "²", "٣",
    "!", "!!", "?", ",", ".", "...", "-", "--", "(", ")", "\"", "'", "’", "#", "@", "&", "*",
    "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "it's", "don't", "I'M",
    "<|endoftext|>", "<|startoftext|>", "</s>",
]
_SEPARATORS = [" ", " ", " ", " ", "", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u200b", "\x1c"]


def _random_prompts(rng: random.Random, count: int) -> list[tuple[str, str]]:
    out = []
    for _ in range(count):
        n = rng.choice([1, 2, 3, 5, 8, 13, 21])
        parts = []
        for _ in range(n):
            parts.append(rng.choice(_FRAGMENTS))
            parts.append(rng.choice(_SEPARATORS))
        text = "".join(parts)
        if rng.random() < 0.2:
            text = text.upper()
        out.append(("random", text))
    return out


def corpus_texts() -> list[tuple[str, str]]:
    """All (tag, text) pairs, deterministic."""
    return FIXED + _long_prompts() + _random_prompts(random.Random(SEED), 120)


# --------------------------------------------------------------------------------------
# Frameworks
# --------------------------------------------------------------------------------------


def _hf_ids(clip_dir: str, spiece_path: str | None, texts: list[str]) -> dict:
    # from_pretrained on a folder: in transformers 5 the constructors take vocab=/merges= data,
    # and silently ignore vocab_file=/merges_file= (giving an empty vocabulary).
    from transformers import CLIPTokenizer, T5Tokenizer

    clip_l = CLIPTokenizer.from_pretrained(clip_dir, model_max_length=CLIP_LENGTH)
    clip_g = CLIPTokenizer.from_pretrained(clip_dir, model_max_length=CLIP_LENGTH, pad_token="!")
    ids = {}
    for key, tok in (("hf_clip_l", clip_l), ("hf_clip_g", clip_g)):
        ids[key] = tok(texts, padding="max_length", max_length=CLIP_LENGTH, truncation=True).input_ids
    content = {"clip": [len(x) for x in clip_l(texts, add_special_tokens=False).input_ids]}
    if spiece_path is not None:
        with tempfile.TemporaryDirectory() as t5_dir:
            shutil.copyfile(spiece_path, os.path.join(t5_dir, "spiece.model"))
            t5 = T5Tokenizer.from_pretrained(t5_dir, extra_ids=0)
        for length in (256, 77):
            ids[f"hf_t5_{length}"] = t5(texts, padding="max_length", max_length=length, truncation=True).input_ids
        content["t5"] = [len(x) for x in t5(texts, add_special_tokens=False).input_ids]
    return {"ids": ids, "content_len": content}


def _keras_ids(clip_dir: str, spiece_path: str | None, texts: list[str]) -> dict:
    import numpy as np

    from golden import keras_side  # noqa: F401  first: the numpy backend, keras-hub 0.32's no-TF tokenizer fix
    from keras_hub.models import CLIPPreprocessor, CLIPTokenizer, T5Preprocessor, T5Tokenizer
    from keras_hub.src.models.stable_diffusion_3.stable_diffusion_3_text_to_image_preprocessor import (
        StableDiffusion3TextToImagePreprocessor,
    )
    vocab, merges = os.path.join(clip_dir, "vocab.json"), os.path.join(clip_dir, "merges.txt")

    def clip(pad_with_end_token):
        tok = CLIPTokenizer(vocabulary=vocab, merges=merges, pad_with_end_token=pad_with_end_token)
        # to_lower=False: workaround 2 (tf.strings.lower); the tokenizer lowercases anyway.
        return CLIPPreprocessor(tok, sequence_length=CLIP_LENGTH, to_lower=False)

    t5_256 = t5_77 = None
    if spiece_path is not None:
        t5_256 = T5Preprocessor(T5Tokenizer(proto=spiece_path), sequence_length=256)
        t5_77 = T5Preprocessor(T5Tokenizer(proto=spiece_path), sequence_length=77)
    sd3 = StableDiffusion3TextToImagePreprocessor(clip(True), clip(False), t5_256)
    out = sd3.generate_preprocess(texts)
    ids = {"keras_clip_l": out["clip_l"], "keras_clip_g": out["clip_g"]}
    if spiece_path is not None:
        ids["keras_t5_256"] = out["t5"]
        ids["keras_t5_77"] = t5_77(texts)["token_ids"]
    return {key: np.asarray(value).astype(int).tolist() for key, value in ids.items()}


# --------------------------------------------------------------------------------------
# Real OpenAI vocabulary (optional)
# --------------------------------------------------------------------------------------


def write_real_clip_vocab(bpe_gz: str, out_dir: str) -> None:
    """vocab.json + merges.txt of the 49,408-token OpenAI CLIP BPE, built as CLIP's
    SimpleTokenizer builds it: byte symbols, the same with </w>, 48,894 merges, BOS, EOS.
    (HF's openai/clip-vit-large-patch14 files hold the same table.)"""
    with gzip.open(bpe_gz, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # line 0 is the "#version" header
    base = list(make_tokenizers.bytes_to_unicode().values())  # OpenAI's order: printable bytes first
    tokens = base + [s + "</w>" for s in base] + ["".join(m.split(" ")) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(m + "\n" for m in merges)


# --------------------------------------------------------------------------------------
# Assembling the corpus
# --------------------------------------------------------------------------------------


def _compress(ids: list[int]) -> dict:
    """{"head", "pad", "length"}: the trailing run of the last id is cut off (pure compression;
    the test rebuilds the full row, so a pad equal to EOS is no ambiguity)."""
    head = list(ids)
    while head and head[-1] == ids[-1]:
        head.pop()
    return {"head": head, "pad": ids[-1], "length": len(ids)}


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _run_all(clip_dir: str, spiece_path: str | None, texts: list[str]) -> tuple[dict, dict]:
    hf = _hf_ids(clip_dir, spiece_path, texts)
    ids = {**hf["ids"], **_keras_ids(clip_dir, spiece_path, texts)}
    return ids, hf["content_len"]


def _entries(tagged: list[tuple[str, str]], ids: dict, content_len: dict) -> tuple[list, dict]:
    entries = []
    summary = {f"{a} vs {b}": 0 for a, b in COMPARED_PAIRS if a in ids and b in ids}
    for row, (tag, text) in enumerate(tagged):
        disagreements = [f"{a} vs {b}" for a, b in COMPARED_PAIRS if a in ids and b in ids and ids[a][row] != ids[b][row]]
        for pair in disagreements:
            summary[pair] += 1
        entries.append(
            {
                "tag": tag,
                "text": text,
                "content_len": {k: v[row] for k, v in content_len.items()},
                "ids": {k: _compress(v[row]) for k, v in ids.items()},
                "disagreements": disagreements,
            }
        )
    return entries, summary


def _versions() -> dict:
    import importlib.metadata as md

    return {name: md.version(name) for name in ("transformers", "tokenizers", "keras-hub", "keras", "sentencepiece")}


REAL_BPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizers", "clip_real",
                        "bpe_simple_vocab_16e6.txt.gz")


def build_corpus(clip_dir: str, spiece_path: str, out_path: str, real_bpe_gz: str | None = None) -> dict:
    """Tokenizes the corpus with every framework setting and writes it as JSON to out_path.

    clip_dir holds vocab.json + merges.txt, spiece_path a SentencePiece model. real_bpe_gz (default:
    $SD3REF_CLIP_BPE_GZ, else the copy in golden/tokenizers/clip_real) is OpenAI's
    bpe_simple_vocab_16e6.txt.gz: the CLIP settings are also run on the real vocabulary. Returns the
    written dict.
    """
    tagged = corpus_texts()
    texts = [text for _, text in tagged]
    ids, content_len = _run_all(clip_dir, spiece_path, texts)
    entries, summary = _entries(tagged, ids, content_len)
    corpus = {
        "format": 1,
        "seed": SEED,
        "generator": "golden/tokenizer_corpus.py",
        "versions": _versions(),
        "files": {
            "clip/vocab.json": _sha256(os.path.join(clip_dir, "vocab.json")),
            "clip/merges.txt": _sha256(os.path.join(clip_dir, "merges.txt")),
            "t5/spiece.model": _sha256(spiece_path),
        },
        "settings": SETTINGS,
        "disagreement_counts": summary,
        "entries": entries,
        "real_clip": None,
    }
    real_bpe_gz = real_bpe_gz or os.environ.get("SD3REF_CLIP_BPE_GZ") or (REAL_BPE if os.path.isfile(REAL_BPE) else None)
    if real_bpe_gz:
        with tempfile.TemporaryDirectory() as real_dir:
            write_real_clip_vocab(real_bpe_gz, real_dir)
            real_ids, real_len = _run_all(real_dir, None, texts)
            real_entries, real_summary = _entries(tagged, real_ids, real_len)
            corpus["real_clip"] = {
                "source": os.path.basename(real_bpe_gz) + " (open_clip), rebuilt by write_real_clip_vocab",
                # the ids: transformers' and keras_hub's tokenizers, as in "settings", at "versions" above
                "outputs": "hf_* by transformers, keras_* by keras_hub (the settings above, their versions above)",
                "files": {name: _sha256(os.path.join(real_dir, name)) for name in ("vocab.json", "merges.txt")},
                "disagreement_counts": real_summary,
                # The texts are those of "entries", in the same order.
                "entries": [{k: e[k] for k in ("content_len", "ids", "disagreements")} for e in real_entries],
            }
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        _dump(corpus, f)
    return corpus


def _dump(corpus: dict, f) -> None:
    """JSON with one line per entry: diffable, and ASCII-escaped so that no editor or git
    setting can rewrite the odd whitespace and control characters of the texts."""
    head = {k: v for k, v in corpus.items() if k not in ("entries", "real_clip")}
    f.write(json.dumps(head, indent=1)[:-2] + ",\n")
    for key in ("entries", "real_clip"):
        value = corpus[key]
        if isinstance(value, dict):
            meta = {k: v for k, v in value.items() if k != "entries"}
            f.write(f' "{key}": ' + json.dumps(meta)[:-1] + ', "entries": [\n')
            rows = value["entries"]
        elif value is None:
            f.write(f' "{key}": null')
            continue
        else:
            f.write(f' "{key}": [\n')
            rows = value
        f.write(",\n".join("  " + json.dumps(row, sort_keys=True) for row in rows))
        f.write("\n ]}" if isinstance(value, dict) else "\n ],\n")
    f.write("\n}\n")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clip_dir")
    parser.add_argument("spiece_path")
    parser.add_argument("out_path")
    parser.add_argument("--real-bpe-gz", default=None)
    args = parser.parse_args()
    result = build_corpus(args.clip_dir, args.spiece_path, args.out_path, args.real_bpe_gz)
    print(json.dumps(result["disagreement_counts"]), json.dumps((result["real_clip"] or {}).get("disagreement_counts")))
