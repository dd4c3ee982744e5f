"""Make the tiny random-weight models the real-server tests load (run by setup_servers.py).

Run with the vLLM venv's Python (it has torch, transformers and sentencepiece); nothing is downloaded.
Writes into OUT (the first argument):

- `tiny-llama/`: a Llama with 2 layers, hidden size 128 and head_dim 64 (vLLM's CPU attention supports
  64; 16 crashes at the first request), random weights, and a 512-piece sentencepiece tokenizer trained
  here on generated text, with a chat template so `/v1/chat/completions` works.
- `tiny-llama.gguf`: the same model converted by llama.cpp's own `convert_hf_to_gguf.py` (argument 2:
  the llama.cpp source folder), f32.
- `broken.gguf`: a GGUF header followed by garbage: llama-server fails to load it.
- `broken-hf/`: a config naming an architecture no vLLM supports.

Usage: python make_models.py OUT LLAMA_CPP_SOURCE
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

SEED = 1234
VOCAB = 512
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "ve", "zo", "pi", "shu", "an", "el", "or", "ist", "ing", "er")
# The benchmark's own words (backends/openai.py) are in the corpus, so its prompts tokenise compactly.
WORDS = (
    "zebra", "context", "question", "answer", "river", "mountain", "history", "energy", "planet", "signal",
    "forest", "engine", "letter", "harbor", "market", "winter", "silver", "bridge", "garden", "window",
    "hello", "world", "the", "a", "of", "and", "to", "is", "say", "tell", "me", "story", "about",
)


def corpus(rng: random.Random, lines: int = 4000) -> str:
    made = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    vocab = list(WORDS) + made
    return "\n".join(" ".join(rng.choice(vocab) for _ in range(rng.randint(5, 20))) for _ in range(lines))


def make_tokenizer(out: Path, rng: random.Random) -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    text = out / "corpus.txt"
    text.write_text(corpus(rng), encoding="utf-8")
    prefix = out / "sp"
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(prefix), vocab_size=VOCAB, model_type="bpe", character_coverage=1.0,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, byte_fallback=True, num_threads=1, minloglevel=2,
    )
    model_dir = out / "tiny-llama"
    model_dir.mkdir()
    # transformers 5 ignores LlamaTokenizer(vocab_file=...) (an empty vocabulary), but converts a
    # folder's tokenizer.model when loading it; the GGUF converter reads tokenizer.model itself.
    shutil.move(f"{prefix}.model", model_dir / "tokenizer.model")
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    ))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if len(tokenizer) != VOCAB:
        raise SystemExit(f"the tokenizer has {len(tokenizer)} pieces, not {VOCAB}")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    for leftover in (text, Path(f"{prefix}.vocab")):
        leftover.unlink()


def make_model(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False, torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out / "tiny-llama", safe_serialization=True)


def make_gguf(out: Path, llama_src: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(llama_src / "gguf-py"), NO_LOCAL_GGUF="")
    subprocess.run(
        [sys.executable, str(llama_src / "convert_hf_to_gguf.py"), str(out / "tiny-llama"), "--outtype", "f32",
         "--outfile", str(out / "tiny-llama.gguf")],
        check=True, env=env,
    )


def make_broken(out: Path) -> None:
    # A valid magic and version, then noise: the loader gets far enough to fail with its own words.
    (out / "broken.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little") + random.Random(SEED).randbytes(4096))
    broken = out / "broken-hf"
    broken.mkdir()
    config = json.loads((out / "tiny-llama" / "config.json").read_text())
    config["architectures"] = ["ShepherdNoSuchModelForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    for name in os.listdir(out / "tiny-llama"):
        if name.startswith("tokenizer") or name.endswith(".model") or name == "special_tokens_map.json":
            shutil.copy(out / "tiny-llama" / name, broken / name)


def main() -> None:
    out, llama_src = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=False)
    rng = random.Random(SEED)
    make_tokenizer(out, rng)
    make_model(out)
    make_gguf(out, llama_src)
    make_broken(out)


if __name__ == "__main__":
    main()
