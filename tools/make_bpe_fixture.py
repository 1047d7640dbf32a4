#!/usr/bin/env python3
"""A Llama-3-style byte-level BPE tokenizer and HF's ids for a few hundred strings (tests/data/fixtures/bpe_llama3/).

No Llama-3 checkpoint can be downloaded here, so the tokenizer is trained with HF `tokenizers` on the shared
corpora, configured exactly as Meta's tokenizer.json is: the Llama-3 pre-tokenizer regex (Split, Isolated), then
ByteLevel without prefix space or its own regex, BPE with ignore_merges, a ByteLevel decoder, the 256 reserved
special tokens' naming (<|begin_of_text|>, <|eot_id|>, <|start_header_id|>, ...), and a TemplateProcessing
post-processor that prepends <|begin_of_text|>. golden.json holds, for each test string, the ids of
tokenizer.encode(text) (special tokens added) and the decoded text with and without special tokens.

usage: .venv/bin/python tools/make_bpe_fixture.py [--shared ../shared/data] [--out tests/data/fixtures/bpe_llama3]
(needs `pip install tokenizers transformers`; tokenizers 0.23.3 and transformers 5.24.0 made the committed files)
"""
import argparse
import json
import os
import random
import sys

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
            "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def corpus(shared):
    lines = []
    for sub in ("text/wikitext-2", "text/tinyshakespeare"):
        d = os.path.join(shared, sub)
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), encoding="utf-8", errors="replace") as f:
                lines += f.read().splitlines()[:20000]
    # A little of every script the tests use, so merges exist beyond ASCII too.
    lines += ["café naïve résumé Ångström São Paulo Zürich straße façade"] * 50
    lines += ["東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다."] * 50
    lines += ["Привет, как дела? Ελληνικά γράμματα. مرحبا بالعالم. שלום עולם"] * 50
    lines += ["I love pizza 🍕 and coffee ☕️ — family: 👨‍👩‍👧‍👦 flags: 🇫🇷🇯🇵"] * 20
    return lines


def test_strings(lines, n_corpus=200):
    rng = random.Random(0)
    picks = [l for l in lines if 0 < len(l) < 300]
    out = rng.sample(picks, n_corpus)
    out += [
        "", " ", "  ", "\n", "\n\n\n", "\t", " \t \n ", "a  b", "a   b   ", "  leading", "trailing  ", "x\r\ny",
        "Hello, world!", "hello world", "HELLO WORLD", "Hello World HELLO", "I'm here, you're there; we'll see",
        "I'M LOUD, YOU'RE LOUDER, WE'LL SEE", "don't can't won't shouldn't", "rock'n'roll", "'quoted' \"double\"",
        "0", "12", "123", "1234", "12345678901234567890", "3.14159", "1,000,000", "2026-12-02", "v1.2.3", "$100.00",
        "a1b2c3", "x=42;y=-7", "0x1F 0b1010 1e-5", "    four spaces", "\n\n  \n\t\tmixed",
        "café", "naïve résumé", "Ångström", "São Paulo", "Zürich straße", "e\u0301 (decomposed é)", "ﬁ ligature",
        "東京は日本の首都です。", "北京是中国的首都", "서울은 한국의 수도입니다", "日本語とEnglishのmix",
        "Привет, мир!", "Ελληνικά", "مرحبا بالعالم", "שלום עולם", "हिन्दी", "ไทย",
        "🍕", "I love pizza 🍕!", "☕️", "👨‍👩‍👧‍👦", "🇫🇷🇯🇵", "emoji🙂in🙂text", "🙂 🙂  🙂",
        "<|begin_of_text|>Hello", "Hi<|eot_id|>", "<|start_header_id|>user<|end_header_id|>\n\nWhat?<|eot_id|>",
        "text <|python_tag|> more", "<|begin_of_text|><|begin_of_text|>", "<|not_a_special|>", "<|eot_id",
        "def f(x):\n    return x**2  # square\n", "{\"key\": [1, 2, 3]}", "<html><body>hi</body></html>",
        "C:\\path\\to\\file.txt", "https://example.com/a?b=c&d=e", "@user #hashtag", "...!!!???", "---===+++",
        "a\u00a0b (nbsp)", "zero\u200bwidth", "tab\tsep\tvalues", "\u2028line sep", "x" * 200, "ab" * 100,
        " ".join(["word"] * 60),
    ]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data", "fixtures",
                                                  "bpe_llama3"))
    ap.add_argument("--vocab", type=int, default=3000)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    lines = corpus(a.shared)
    trainer = trainers.BpeTrainer(vocab_size=a.vocab, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(lines, trainer)
    tok.add_special_tokens(SPECIALS)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    tok.save(os.path.join(a.out, "tokenizer.json"))
    with open(os.path.join(a.out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
                   "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast",
                   "chat_template": LLAMA3_CHAT_TEMPLATE}, f, indent=2)

    cases = []
    for s in test_strings(lines):
        enc = tok.encode(s)
        cases.append({"text": s, "ids": enc.ids, "decoded": tok.decode(enc.ids, skip_special_tokens=False),
                      "decoded_skip_special": tok.decode(enc.ids, skip_special_tokens=True)})
    # Meta's chat template rendered by transformers, for eqat's llama3 template (llm/prompt.h).
    chats = []
    try:
        from transformers import PreTrainedTokenizerFast
        hf = PreTrainedTokenizerFast(tokenizer_file=os.path.join(a.out, "tokenizer.json"), bos_token="<|begin_of_text|>",
                                     eos_token="<|eot_id|>", chat_template=LLAMA3_CHAT_TEMPLATE)
        for msgs in ([{"role": "user", "content": "<image>\nWhat is shown in this image?"}],
                     [{"role": "system", "content": "You are brief. "},
                      {"role": "user", "content": "<image>\nWhat colour is it?"},
                      {"role": "assistant", "content": " Red. "},
                      {"role": "user", "content": "And the shape?"}]):
            chats.append({"messages": msgs, "rendered": hf.apply_chat_template(msgs, tokenize=False,
                                                                               add_generation_prompt=True)})
    except ImportError:
        sys.exit("transformers is needed for the chat-template goldens (pip install transformers)")
    with open(os.path.join(a.out, "golden.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizers_version": __import__("tokenizers").__version__, "bos_id": bos,
                   "vocab_size": tok.get_vocab_size(), "cases": cases, "chats": chats}, f, ensure_ascii=False,
                  indent=0)
    print(f"{a.out}: vocab {tok.get_vocab_size()}, {len(cases)} cases")


if __name__ == "__main__":
    main()
