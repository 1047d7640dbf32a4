#!/usr/bin/env python3
"""Writes the hand-made seeds of tokenizer_fuzz, image_fuzz, eval_fuzz and llama2c_fuzz under fuzz/corpus/.

Plain Python 3 (no packages). Multi-file seeds use fuzz_util.h's container: a flags byte, then the files joined by
the line "\\n--8<--\\n". Re-running rewrites the same bytes.
"""
import json
import os
import struct
import zlib

ROOT = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(ROOT)
SEP = b"\n--8<--\n"


def out(target, name, data):
    d = os.path.join(ROOT, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def container(flags, *files):
    return bytes([flags]) + SEP.join(f if isinstance(f, bytes) else f.encode() for f in files)


# ---- protobuf (the subset sentencepiece_model.proto needs; same field numbers as src/data/llama2c.cpp) ----
def varint(v):
    v &= (1 << 64) - 1
    b = b""
    while v >= 0x80:
        b += bytes([(v & 0x7F) | 0x80])
        v >>= 7
    return b + bytes([v])


def key(field, wire):
    return varint(field << 3 | wire)


def pb_int(field, v):
    return key(field, 0) + varint(v)


def pb_bytes(field, s):
    s = s.encode() if isinstance(s, str) else s
    return key(field, 2) + varint(len(s)) + s


def pb_float(field, v):
    return key(field, 5) + struct.pack("<f", v)


def sp_model(pieces, model_type=2, byte_fallback=False):
    """pieces: (text, score, type) with type NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, BYTE 6."""
    m = b""
    for text, score, typ in pieces:
        m += pb_bytes(1, pb_bytes(1, text) + pb_float(2, score) + pb_int(3, typ))
    trainer = (pb_int(3, model_type) + pb_int(4, len(pieces)) + pb_int(35, int(byte_fallback)) + pb_int(40, 0) +
               pb_int(41, 1) + pb_int(42, 2) + pb_int(43, -1))
    m += pb_bytes(2, trainer)
    m += pb_bytes(3, pb_bytes(1, "identity") + pb_int(3, 1) + pb_int(4, 0) + pb_int(5, 1))
    return m


SPACE = "\u2581"
BASE = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
WORDS = [SPACE + "the", SPACE + "a", "he", "th", SPACE + "t", "in", "er", SPACE + "is"]
LETTERS = [SPACE] + list("abcdefghijklmnopqrstuvwxyz?.,") + ["\u00e9", "\u732b"]


def normal(texts, start):
    return [(t, start - i, 1) for i, t in enumerate(texts)]


def tokenizer_seeds():
    small = sp_model(BASE + normal(WORDS + LETTERS, -1.0))
    byte_model = sp_model(BASE + [("<0x%02X>" % b, 0.0, 6) for b in range(256)] + normal(WORDS + LETTERS, -1.0),
                          byte_fallback=True)
    unigram = sp_model(BASE + [("<pad>", 0.0, 3)] + normal(WORDS + LETTERS, -2.0), model_type=1)
    text = "USER: <image>\nWhat is the cat? </s><s> h\u00e9llo \u732b\u732b 12\tok"
    tj = json.dumps({"added_tokens": [{"id": 0, "content": "<unk>", "special": True},
                                      {"id": 43, "content": "<image>", "special": True},
                                      {"id": 44, "content": "<pad>", "special": False}]})
    at = json.dumps({"<image>": 43, "<pad>": 44})
    tc = json.dumps({"added_tokens_decoder": {"43": {"content": "<image>", "special": True},
                                              "1": {"content": "<s>", "special": True}},
                     "bos_token": {"content": "<s>"}, "eos_token": "</s>", "unk_token": "<unk>",
                     "pad_token": "<pad>"})
    out("tokenizer", "small_bpe", container(0, small, "", "", "", text))
    out("tokenizer", "small_bpe_all_json", container(7, small, tj, at, tc, text))
    out("tokenizer", "byte_fallback", container(4, byte_model, "", "", json.dumps({"pad_token": None}),
                                                "\u00e9\u732b\U0001F600 x\x01y"))
    # The inputs of the tokenizer findings (fuzz/README.md), after their fixes InputErrors.
    out("tokenizer", "added_id_int64_max", container(2, small, "", '{"<x>": 9223372036854775807}', "", "ab<x>"))
    no_bos = sp_model([("<unk>", 0.0, 2), ("<s>", 0.0, 1), ("</s>", 0.0, 3), ("a", -1.0, 1), ("b", -2.0, 1)])
    out("tokenizer", "no_control_bos", container(8, no_bos, "", "", "", "ab"))
    nul = sp_model([("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3), ("\0h", -1.0, 1), ("a", -2.0, 1)],
                   model_type=1)
    out("tokenizer", "unigram_nul_piece", container(8, nul, "", "", "", "ab"))
    out("tokenizer", "unigram_model_file", container(8, unigram, "", "", "", "the cat is a hat"))
    with open(os.path.join(REPO, "tests/data/fixtures/tiny_llava/tokenizer.model"), "rb") as f:
        tiny = f.read()
    with open(os.path.join(REPO, "tests/data/fixtures/tiny_llava/added_tokens.json"), "rb") as f:
        tiny_at = f.read()
    out("tokenizer", "tiny_llava", container(2, tiny, "", tiny_at, "", "USER: <image>\nDescribe it. ASSISTANT:"))


# ---- images ----
def png(w, h, color_type, bit_depth, raw, extra=b""):
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", zlib.compress(raw)) +
            chunk(b"IEND", b""))


def image_seeds():
    w, h = 5, 3
    rgb = b"".join(b"\x00" + bytes((x * 50 + y * 7 + c * 30) % 256 for x in range(w) for c in range(3))
                   for y in range(h))
    out("image", "rgb_5x3.png", png(w, h, 2, 8, rgb))
    rgba16 = b"".join(b"\x00" + b"".join(struct.pack(">HHHH", x * 9000, y * 20000, 500, 65535 - x) for x in range(2))
                      for y in range(2))
    out("image", "rgba16_2x2.png", png(2, 2, 6, 16, rgba16))
    pal = b"\x00\x01\x02\x00\x01"
    plte = struct.pack(">I", 9) + b"PLTE" + bytes([255, 0, 0, 0, 255, 0, 0, 0, 255])
    plte += struct.pack(">I", zlib.crc32(plte[4:]) & 0xFFFFFFFF)
    out("image", "palette_4x1.png", png(4, 1, 3, 8, pal, plte))
    # I4's shape: an empty IDAT chunk before the data (legal PNG; eqat drops it before stb).
    good = png(w, h, 2, 8, rgb)
    i = good.index(b"IDAT") - 4
    out("image", "empty_idat_first.png", good[:i] + struct.pack(">I", 0) + b"IDAT" +
        struct.pack(">I", zlib.crc32(b"IDAT") & 0xFFFFFFFF) + good[i:])
    out("image", "gray_interlaced_hint.png", png(3, 3, 0, 1, b"\x00\xa0\x00\x40\x00\xe0"))
    for name in ("gray.png", "one_px.png", "tall.png", "palette.gif", "image.bmp", "truncated.jpg"):
        with open(os.path.join(REPO, "tests/data/images", name), "rb") as f:
            out("image", name, f.read())
    # A 2x2 24-bit BMP written by hand. (The JPEG seeds cpython_python*.jpg and cpython_python.gif are CPython's
    # Lib/test/imghdrdata files, copied, not generated: fuzz/README.md.)
    row = b"\x00\x00\xff\x00\xff\x00\x00\x00"  # 2 BGR pixels + 2 bytes padding
    bmp_pixels = row * 2
    out("image", "tiny.bmp", b"BM" + struct.pack("<IHHI", 54 + len(bmp_pixels), 0, 0, 54) +
        struct.pack("<IiiHHIIiiII", 40, 2, 2, 1, 24, 0, len(bmp_pixels), 2835, 2835, 0, 0) + bmp_pixels)


# ---- eval ----
def jl(*records):
    return "".join(json.dumps(r) + "\n" for r in records)


def eval_seeds():
    ans = jl({"question_id": 1, "prompt": "Is there a cat?", "text": "Yes", "answer_id": "x", "model_id": "m",
              "metadata": {}},
             {"question_id": "2", "prompt": "Is there a dog?", "text": "No, there is not.", "metadata": {"k": 1}})
    qs = jl({"question_id": 1, "image": "a.png", "text": "Is there a cat?", "category": "random"},
            {"question_id": "2", "image": "b.png", "text": "Is there a dog?", "category": "popular"})
    out("eval", "read_answers", container(32, ans + '{"question_id": 3, "te'))
    out("eval", "read_questions", container(1, "", qs))
    out("eval", "shapes", container(3, ans, qs, jl({"question_id": 1, "text": "yes."}, {"question_id": "2",
                                                                                        "text": "no"})))
    out("eval", "pope", container(4, ans, qs, jl({"label": "yes"}), jl({"label": "no"}, {"label": "yes"})))
    mme_ans = jl({"question_id": "existence/000000006040.jpg", "prompt": "Is there a train in this image?",
                  "text": "Yes"},
                 {"question_id": "existence/000000006040.jpg", "prompt": "Is there a bed in this image?",
                  "text": "No"},
                 {"question_id": "OCR/0001.jpg", "prompt": "Is the word in the logo \"high\"?", "text": "yes"},
                 {"question_id": "OCR/0001.jpg", "prompt": "Is the word in the logo \"low\"?", "text": "other"})
    out("eval", "mme", container(5, mme_ans, "",
                                 "000000006040.jpg\tIs there a train in this image? Please answer yes or no.\tYes\n"
                                 "000000006040.jpg\tIs there a bed in this image? Please answer yes or no.\tNo\n",
                                 "0001.jpg\tIs the word in the logo \"high\"? Please answer yes or no.\tYes\r\n"
                                 "0001.jpg\tIs the word in the logo \"low\"? Please answer yes or no.\tNo\n"))
    sqa_ans = jl({"question_id": "4", "prompt": "Q\nA. x\nB. y", "text": "The answer is B."},
                 {"question_id": "7", "prompt": "Q", "text": "A"})
    llava_list = json.dumps([{"id": "4", "image": "4.png", "conversations": [
        {"from": "human", "value": "<image>\nWhich?\nA. x\nB. y"}, {"from": "gpt", "value": "B"}]},
        {"id": "7", "conversations": [{"from": "human", "value": "Q\nA. p\nB. q\nC. r"},
                                      {"from": "gpt", "value": "C"}]}])
    problems = json.dumps({"4": {"split": "test", "choices": ["x", "y"], "answer": 1, "image": "i.png"},
                           "7": {"split": "test", "choices": ["p", "q", "r"], "answer": 0, "image": None},
                           "9": {"split": "train", "choices": [], "answer": 0}})
    out("eval", "scienceqa_llava", container(6, sqa_ans, "", llava_list))
    out("eval", "scienceqa_problems", container(22, sqa_ans, "", problems))
    mm_ans = jl({"question_id": 0, "prompt": "q", "text": "B"}, {"question_id": 1000000, "prompt": "q",
                                                                 "text": "The answer is (A) red"})
    tsv = ("index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
           "0\tWhat colour?\tnan\tred\tblue\tnan\tnan\tB\tcolour\tiVBORw0KGgo=\n"
           "1000000\tWhat colour?\t\"a \"\"quoted\"\"\thint\"\tblue\tred\t\t\tB\tcolour\t\n")
    out("eval", "mmbench", container(7, mm_ans, "", tsv))
    out("eval", "read_tsv_base64", container(13, "", "aGVsbG8gd29ybGQ=\n", tsv))
    tv_ans = jl({"question_id": "img1", "prompt": "<image>\nwhat is written?\nReference OCR token: STOP\nAnswer "
                 "the question using a single word or phrase.", "text": "Stop"},
                {"question_id": "img2", "prompt": "what brand?\nAnswer the question using a single word or phrase.",
                 "text": "two"})
    tv_gt = json.dumps({"data": [{"image_id": "img1", "question": "what is written?", "answers": ["stop"] * 9 +
                                  ["STOP sign"]},
                                 {"image_id": "img2", "question": "what brand?", "answers": ["2"] * 10}]})
    out("eval", "textvqa", container(8, tv_ans, "", tv_gt))
    gqa_ans = jl({"question_id": "201", "prompt": "q", "text": "Yes."}, {"question_id": 202, "prompt": "q",
                                                                          "text": "left"})
    out("eval", "gqa", container(25, gqa_ans, "", json.dumps({"201": {"answer": "yes"}, "202": {"answer": "right"},
                                                              "203": {"answer": "no"}})))
    seed_gt = json.dumps({"question_type": {"Scene Understanding": 1, "Instance Identity": 2},
                          "questions": [{"question_id": "101", "answer": "A", "question_type_id": 1,
                                         "data_type": "image"},
                                        {"question_id": 102, "answer": "C", "question_type_id": 2,
                                         "data_type": "video"}]})
    out("eval", "seed", container(10, jl({"question_id": "101", "prompt": "q", "text": "A"},
                                         {"question_id": 102, "prompt": "q", "text": "B"}), "", seed_gt))
    # The inputs of the two eval findings (fuzz/README.md): dotted category names, a SEED question without an id.
    out("eval", "mmbench_dotted_categories", container(7, jl({"question_id": 0, "text": "A"}, {"question_id": 1,
                                                                                            "text": "B"}),
                                                      "", "index\tquestion\tA\tB\tanswer\tcategory\n"
                                                          "0\tq\tx\ty\tA\ta\n1\tq\tx\ty\tA\ta.b\n"))
    out("eval", "seed_question_without_id", container(10, jl({"question_id": 0, "text": "A"}), "",
                                                      json.dumps({"questions": [{"answer": "A"}]})))
    out("eval", "vqav2_upload", container(11, jl({"question_id": 5, "prompt": "q", "text": "Two dogs, isn't it?"})))
    out("eval", "gqa_upload", container(12, gqa_ans))


# ---- llama2.c ----
def llama2c_seeds():
    # Smallest legal legacy checkpoint: dim 2, hidden 3, 1 layer, 1 head, 1 kv head, vocab 4, seq_len 2;
    # unshared classifier (negative vocab) in the second seed.
    def ckpt(vocab):
        d, f, L, nh, nkv, V, S = 2, 3, 1, 1, 1, abs(vocab), 2
        kv = d // nh * nkv
        n = V * d + L * d + L * d * d + 2 * L * kv * d + L * d * d + L * d + 3 * L * f * d + d + 2 * S * (d // nh // 2)
        if vocab < 0:
            n += V * d
        return struct.pack("<7i", d, f, L, nh, nkv, vocab, S) + struct.pack("<%df" % n, *[0.01 * i for i in range(n)])

    def tok(pieces, max_len=None):
        body = b"".join(struct.pack("<fi", -float(i), len(p)) + p for i, p in enumerate(pieces))
        return struct.pack("<i", max_len or max(len(p) for p in pieces)) + body

    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n", b" the"]
    out("llama2c", "shared_classifier", container(0, ckpt(4), tok(pieces)))
    out("llama2c", "unshared_classifier", container(0, ckpt(-4), tok(pieces)))
    out("llama2c", "tokenizer_bytes", container(1, b"", tok([b"<unk>", b"\n<s>\n", b"\n</s>\n"] +
                                                             [b"<0x%02X>" % b for b in range(256)] +
                                                             [b" a", b"b", b"\xe7\x8c\xab"])))
    # The llama2c finding's shape (fuzz/README.md): one byte token only, refused since.
    out("llama2c", "tokenizer_one_byte_token", container(1, b"", tok([b"<unk>", b"\n<s>\n", b"\n</s>\n", b"<0x41>"])))
    with open(os.path.join(REPO, "tests/data/models/stories260K/tok512.bin"), "rb") as f:
        out("llama2c", "tok512", container(1, b"", f.read()))


if __name__ == "__main__":
    tokenizer_seeds()
    image_seeds()
    eval_seeds()
    llama2c_seeds()
