"""Tiny tokenizer files for the golden fixtures.

CLIP: an openai/CLIP-format byte-level BPE (vocab.json + merges.txt). The 512 base symbols (every byte
symbol, alone and with the end-of-word suffix) come first, then a few merges learned from a small corpus,
then <|startoftext|> and <|endoftext|>. EOS must have the LARGEST id: KerasHub pools CLIP at
argmax(token_ids), HF at the first eos_token_id; with EOS last both pick the same position.

T5: a SentencePiece unigram model trained on the same corpus (pad 0, eos 1, unk 2, no bos) — T5's ids.
"""

from __future__ import annotations

import collections
import json
import os
import re

CORPUS = [
    "a photo of a cat",
    "a red cube on a blue table",
    "an astronaut riding a horse on the moon",
    "a watercolor painting of a mountain lake at sunset",
    "portrait of an old fisherman, detailed, 35mm photograph",
    "the quick brown fox jumps over the lazy dog",
    "a bowl of fruit: apples, pears and oranges",
    "city street at night in the rain, neon lights",
]
NUM_MERGES = 60


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte → printable unicode symbol table, in OpenAI's order: the printable bytes first
    (so "!" is symbol 0, the id CLIP-G pads with), then the others mapped to 256 + n."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower())


def learn_bpe(corpus: list[str], num_merges: int) -> list[tuple[str, str]]:
    byte_sym = bytes_to_unicode()
    counts = collections.Counter(w for line in corpus for w in _words(line))
    words = {}
    for w, n in counts.items():
        syms = [byte_sym[b] for b in w.encode("utf-8")]
        syms[-1] += "</w>"
        words[tuple(syms)] = n
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for syms, n in words.items():
            for a, b in zip(syms, syms[1:]):
                pairs[a, b] += n
        if not pairs:
            break
        # Ties broken by the pair itself so the result never depends on dict order.
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        merged = {}
        for syms, n in words.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            merged[tuple(out)] = n
        words = merged
    return merges


def write_clip(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    base = list(bytes_to_unicode().values())
    tokens = base + [s + "</w>" for s in base]
    merges = learn_bpe(CORPUS, NUM_MERGES)
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, indent=0)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)


def write_t5(out_dir: str) -> None:
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    # Train from an iterator into memory: a file-based run stores the input path in the model,
    # which would make the bytes depend on where the generator ran.
    with open(os.path.join(out_dir, "spiece.model"), "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(CORPUS * 4), model_writer=f, vocab_size=64,
            model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
            eos_piece="</s>", unk_piece="<unk>", hard_vocab_limit=False, num_threads=1,
            minloglevel=2,
        )


def paths(root: str) -> dict:
    """Where ``write_all(root)`` puts the tokenizer files: the CLIP folder and the T5 sentencepiece model."""
    return {"clip_dir": os.path.join(root, "clip"), "spiece": os.path.join(root, "t5", "spiece.model")}


def write_all(root: str) -> dict:
    """Writes tokenizers/clip and tokenizers/t5 under root; returns their paths."""
    p = paths(root)
    write_clip(p["clip_dir"])
    write_t5(os.path.dirname(p["spiece"]))
    return p
