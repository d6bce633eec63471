"""Data sources, packing and the training dataset (upq_hf.data) and the built-in prompts."""

from __future__ import annotations

import difflib
import json
import warnings

import pytest
import torch

from upq_hf import data
from upq_hf.data import TokenBlockDataset, build_sequences, calibration_data, load_texts
from upq_hf.prompts import EVAL_PROMPTS, SEED_PROMPTS

PARAS = ["The first paragraph\nspans two lines.", "Second paragraph.", "Third one, with more words in it."]
CONV = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}]


@pytest.fixture(scope="module")
def tok():
    from upq_hf.models import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="module")
def tiny_model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    model.config._name_or_path = "tiny-random-llama"
    return model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UPQ_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "self_data"


def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------- prompts

def test_seed_prompts_many_varied_deterministic():
    import importlib

    import upq_hf.prompts as prompts

    assert len(SEED_PROMPTS) >= 300
    assert len(set(SEED_PROMPTS)) == len(SEED_PROMPTS)
    assert all(isinstance(p, str) and len(p) > 10 for p in SEED_PROMPTS)
    assert importlib.reload(prompts).SEED_PROMPTS == SEED_PROMPTS  # same order on every build
    for constraint in ("Answer in lowercase", "Use at most 30 words", "End your answer with the word 'done'",
                       "Use exactly 3 bullet points"):
        assert sum(constraint in p for p in SEED_PROMPTS) >= 2, constraint
    for kind in ("Explain", "How do I", "List", "short story", "email", "ummar", "Compare", "How much", "function",
                 "advice", "Define", "Rewrite", "Classify"):
        assert any(kind in p for p in SEED_PROMPTS), kind
    # any prefix mixes the task kinds
    assert len({p.split()[0] for p in SEED_PROMPTS[:64]}) >= 10


def test_eval_prompts_disjoint_from_seed():
    assert 35 <= len(EVAL_PROMPTS) <= 45
    assert len(set(EVAL_PROMPTS)) == len(EVAL_PROMPTS)
    assert not set(EVAL_PROMPTS) & set(SEED_PROMPTS)
    seed_heads = {tuple(p.lower().split()[:3]) for p in SEED_PROMPTS}
    for e in EVAL_PROMPTS:
        assert tuple(e.lower().split()[:3]) not in seed_heads, e
        for s in SEED_PROMPTS:
            matcher = difflib.SequenceMatcher(None, e.lower(), s.lower())
            assert matcher.quick_ratio() < 0.6 or matcher.ratio() < 0.6, (e, s)  # quick_ratio bounds ratio


# --------------------------------------------------------------------------------------------- local sources

def test_txt_paragraphs(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("\n\n".join(PARAS) + "\n\n  \n", encoding="utf-8")
    assert load_texts(str(f)) == PARAS
    assert load_texts(f) == PARAS  # a Path works too


def test_jsonl_text_messages_and_field(tmp_path):
    f = tmp_path / "t.jsonl"
    _write_jsonl(f, [{"text": "alpha"}, {"text": ""}, {"other": 1}, {"text": "beta"}])
    assert load_texts(str(f)) == ["alpha", "beta"]

    g = tmp_path / "m.jsonl"
    sharegpt = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]
    _write_jsonl(g, [{"messages": CONV}, {"conversations": sharegpt}])
    assert load_texts(str(g)) == [CONV, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]]

    h = tmp_path / "f.jsonl"
    _write_jsonl(h, [{"body": "one", "text": "ignored"}, {"body": "two"}])
    assert load_texts(str(h), text_field="body") == ["one", "two"]
    with pytest.raises(ValueError, match="no usable text"):
        load_texts(str(h), text_field="missing")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        load_texts(str(bad))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p1", "p2", " "], "id": [1, 2, 3]}), tmp_path / "t.parquet")
    assert load_texts(str(tmp_path / "t.parquet")) == ["p1", "p2"]
    pq.write_table(pa.table({"messages": [CONV]}), tmp_path / "m.parquet")
    assert load_texts(str(tmp_path / "m.parquet")) == [CONV]
    pq.write_table(pa.table({"id": [1]}), tmp_path / "none.parquet")
    with pytest.raises(ValueError, match="text_field"):
        load_texts(str(tmp_path / "none.parquet"))


def test_folder_recursive_sorted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "a.txt").write_text("from a")
    _write_jsonl(tmp_path / "b" / "c.jsonl", [{"text": "from c"}])
    pq.write_table(pa.table({"text": ["from d"]}), tmp_path / "b" / "deep" / "d.parquet")
    (tmp_path / "b" / "empty.txt").write_text("")
    (tmp_path / "b" / "notes.md").write_text("not read")
    (tmp_path / ".hidden" / "x.txt").write_text("not read either")
    assert load_texts(str(tmp_path)) == ["from a", "from c", "from d"]
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "x.md").write_text("x")
    with pytest.raises(ValueError, match="nothing"):
        load_texts(str(empty))


def test_lists_and_max_texts():
    texts = [f"text number {i}" for i in range(20)]
    assert load_texts(texts) == texts
    assert load_texts([CONV, "plain", CONV]) == [CONV, "plain", CONV]
    assert load_texts(CONV) == [CONV]  # a single bare conversation
    sub = load_texts(texts, max_texts=5, seed=1)
    assert len(sub) == 5 and sub == sorted(sub, key=texts.index)  # a subset, in original order
    assert sub == load_texts(texts, max_texts=5, seed=1)
    assert sub != load_texts(texts, max_texts=5, seed=2)
    with pytest.raises(ValueError, match="item 1"):
        load_texts(["ok", 3])
    with pytest.raises(ValueError, match="no usable text"):
        load_texts(["", "  "])
    with pytest.raises(TypeError, match="'self' only"):
        load_texts(texts, max_new_tokens=3)


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_texts(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        load_texts(tmp_path / "missing_dir")
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    with pytest.raises(ValueError, match="empty.txt.*no usable text"):
        load_texts(str(tmp_path / "empty.txt"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl"):
        load_texts(str(tmp_path / "empty.jsonl"))


# --------------------------------------------------------------------------------------------- Hub

def test_hub_dataset_via_load_dataset(monkeypatch):
    import datasets

    calls, consumed = [], []

    def fake_load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))

        def stream():
            for i in range(1000):
                consumed.append(i)
                yield {"content": f"doc {i}" if i % 3 else "", "meta": i}
        return stream()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    items = load_texts("wikitext:wikitext-2-raw-v1", split="validation", max_texts=4)
    assert calls == [("wikitext", "wikitext-2-raw-v1", "validation", True)]
    assert items == ["doc 1", "doc 2", "doc 4", "doc 5"]  # empty texts skipped, "content" auto-detected
    assert len(consumed) == 6  # the stream is not read past what is needed
    with pytest.raises(ValueError, match="no usable text in field 'meta'"):  # ints are not text
        load_texts("allenai/c4", text_field="meta", max_texts=2)
    assert calls[-1] == ("allenai/c4", None, "train", True)


def test_hub_field_and_failures(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: iter([{"messages": CONV}, {"messages": CONV}]))
    assert load_texts("org/chat", max_texts=1) == [CONV]
    with pytest.raises(ValueError, match="no usable text in field 'prompt'"):
        load_texts("org/chat", text_field="prompt")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'x' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"unknown dataset 'my_corpus'.*not a local file/folder.*built-in.*"
                                         r"Couldn't reach"):
        load_texts("my_corpus")
    with pytest.raises(ValueError, match="did you mean 'self'"):
        load_texts("slef")

    def fails_lazily(*args, **kwargs):
        def stream():
            raise OSError("connection dropped")
            yield  # pragma: no cover
        return stream()

    monkeypatch.setattr(datasets, "load_dataset", fails_lazily)
    with pytest.raises(ValueError, match="connection dropped"):
        load_texts("org/data")

    def must_not_be_called(*args, **kwargs):
        raise AssertionError("an invalid id must not reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", must_not_be_called)
    with pytest.raises(ValueError, match="unknown dataset 'no such thing'"):
        load_texts("no such thing")


# --------------------------------------------------------------------------------------------- "self"

class _GenerateSpy:
    """Wraps the model's real ``generate`` and records (input_ids, attention_mask, output) per call."""

    def __init__(self, model):
        self.original, self.calls = type(model).generate.__get__(model), []

    def __call__(self, **kwargs):
        out = self.original(**kwargs)
        self.calls.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone(), out.clone()))
        return out


def test_self_generates_caches_and_reuses(tok, tiny_model, cache, monkeypatch):
    prompts = list(SEED_PROMPTS[:5])
    spy = _GenerateSpy(tiny_model)
    monkeypatch.setattr(tiny_model, "generate", spy)
    convs = load_texts("self", model=tiny_model, tokenizer=tok, n_prompts=3, max_new_tokens=4, batch_size=2,
                       progress=False)
    assert [c[0] for c in convs] == [{"role": "user", "content": p} for p in prompts[:3]]
    assert all(c[1]["role"] == "assistant" and isinstance(c[1]["content"], str) for c in convs)
    assert sum(ids.shape[0] for ids, _, _ in spy.calls) == 3 and len(spy.calls) == 2
    assert tok.padding_side == "right"  # restored after left-padded generation
    # left padding: every row ends with a real token; a shorter prompt is padded at the start
    for ids, mask, out in spy.calls:
        assert bool(mask[:, -1].all())
        assert out.shape[1] <= ids.shape[1] + 4
    assert any(not bool(mask[:, 0].all()) for _, mask, _ in spy.calls)
    # the answer is the decoded continuation of the prompt that produced it
    for ids, mask, out in spy.calls:
        for row in range(ids.shape[0]):
            prompt_text = tok.decode(ids[row][mask[row].bool()])
            conv = next(c for c in convs if c[0]["content"] in prompt_text)
            assert conv[1]["content"] == tok.decode(out[row, ids.shape[1]:], skip_special_tokens=True).strip()

    files = list(cache.glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("tiny-random-llama-")
    stored = json.loads(files[0].read_text())
    assert set(stored["answers"]) == set(prompts[:3])

    # second call: everything from the cache, generate is never called
    def no_generate(**kwargs):
        raise AssertionError("generate called although the answers are cached")

    monkeypatch.setattr(tiny_model, "generate", no_generate)
    assert load_texts("self", model=tiny_model, tokenizer=tok, n_prompts=3, max_new_tokens=4, progress=False) == convs
    subset = load_texts("self", model=tiny_model, tokenizer=tok, max_texts=2, max_new_tokens=4, progress=False)
    assert subset == convs[:2]

    # more prompts: only the missing ones are generated, and the file grows
    spy2 = _GenerateSpy(tiny_model)
    monkeypatch.setattr(tiny_model, "generate", spy2)
    more = load_texts("self", model=tiny_model, tokenizer=tok, n_prompts=5, max_new_tokens=4, progress=False)
    assert more[:3] == convs and len(more) == 5
    assert sum(ids.shape[0] for ids, _, _ in spy2.calls) == 2
    assert set(json.loads(files[0].read_text())["answers"]) == set(prompts)
    assert not list(cache.glob("*.tmp")) and not list(cache.glob(".*"))  # atomic write left no temp file


def test_self_cache_key_depends_on_settings_and_weights(tok, tiny_model, cache):
    base = data.self_cache_path(tiny_model, tok, max_new_tokens=4)
    assert base.parent == cache
    assert base == data.self_cache_path(tiny_model, tok, max_new_tokens=4)
    assert base != data.self_cache_path(tiny_model, tok, max_new_tokens=8)
    weight = tiny_model.model.layers[1].mlp.down_proj.weight
    before = data.weights_fingerprint(tiny_model)
    with torch.no_grad():
        weight[3, 5] += 1e-3
    try:
        assert data.weights_fingerprint(tiny_model) != before
        assert data.self_cache_path(tiny_model, tok, max_new_tokens=4) != base
    finally:
        with torch.no_grad():
            weight[3, 5] -= 1e-3


def test_self_sampled_answers_follow_the_greedy_ones_and_are_cached_per_draw(tok, tiny_model, cache, monkeypatch):
    greedy = load_texts("self", model=tiny_model, tokenizer=tok, n_prompts=3, max_new_tokens=6, progress=False)
    seen = []
    original = type(tiny_model).generate.__get__(tiny_model)

    def recording(**kwargs):
        seen.append(kwargs["generation_config"])
        return original(**kwargs)

    monkeypatch.setattr(tiny_model, "generate", recording)
    both = load_texts("self", model=tiny_model, tokenizer=tok, n_prompts=3, max_new_tokens=6, sampled=2,
                      progress=False)
    assert len(both) == 9 and both[:3] == greedy  # the greedy answers first, read from their cache
    assert [c[0] for c in both[3:6]] == [c[0] for c in greedy] == [c[0] for c in both[6:]]
    assert seen and all(g.do_sample and g.temperature == data.self_data.SAMPLE_TEMPERATURE for g in seen)
    # a random tiny model's sampled answers differ from its greedy ones and from each other's draw
    texts = [c[1]["content"] for c in both]
    assert texts[3:6] != texts[:3] and texts[6:] != texts[3:6]
    paths = {data.self_cache_path(tiny_model, tok, max_new_tokens=6, draw=d) for d in (0, 1, 2)}
    assert len(paths) == 3 and all(p.is_file() for p in paths)
    # reproducible: the same draws again come from the cache, and a fresh cache samples them alike
    monkeypatch.setattr(tiny_model, "generate", lambda **kw: (_ for _ in ()).throw(AssertionError("cached")))
    assert load_texts("self", model=tiny_model, tokenizer=tok, n_prompts=3, max_new_tokens=6, sampled=2,
                      progress=False) == both
    monkeypatch.setattr(tiny_model, "generate", original)
    for p in paths:
        p.unlink()
    assert load_texts("self", model=tiny_model, tokenizer=tok, n_prompts=3, max_new_tokens=6, sampled=2,
                      progress=False) == both
    with pytest.raises(ValueError, match="sampled must be a whole number"):
        load_texts("self", model=tiny_model, tokenizer=tok, n_prompts=3, sampled=-1, progress=False)


def test_self_needs_the_model(tok, cache):
    with pytest.raises(ValueError, match="needs the unquantized model"):
        load_texts("self", tokenizer=tok)


# --------------------------------------------------------------------------------------------- packing

def _items(n=30):
    return [f"Sentence {i} about packing tokens into blocks, number {i * 7}." for i in range(n)] + [CONV]


def test_build_sequences_shapes_and_determinism(tok):
    items = _items()
    a = build_sequences(items, tok, seqlen=16, nsamples=8, seed=0)
    assert a.dtype == torch.long and a.shape == (8, 16)
    assert torch.equal(a, build_sequences(items, tok, seqlen=16, nsamples=8, seed=0))
    assert not torch.equal(a, build_sequences(items, tok, seqlen=16, nsamples=8, seed=1))
    # packing: the blocks are consecutive pieces of one stream of whole items (texts end with EOS)
    pieces = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in items[:-1]]
    pieces.append(tok(tok.apply_chat_template(CONV, tokenize=False), add_special_tokens=False)["input_ids"])
    stream, pos, used = a.reshape(-1).tolist(), 0, 0
    while pos < len(stream):
        rest = stream[pos:]
        match = next(p for p in pieces if p[:len(rest)] == rest[:len(p)])  # StopIteration if no item fits
        pos, used = pos + len(match), used + 1
    assert used >= 5
    ids, mask = build_sequences(items, tok, seqlen=16, nsamples=8, seed=0, return_loss_mask=True)
    assert torch.equal(ids, a) and mask.dtype == torch.bool and mask.shape == (8, 16)


def test_plain_text_gets_eos_and_conversation_uses_template(tok):
    text_ids = tok("hello there", add_special_tokens=False)["input_ids"]
    seq = build_sequences(["hello there"], tok, seqlen=len(text_ids) + 1, nsamples=1)
    assert seq[0].tolist() == text_ids + [tok.eos_token_id]

    rendered = tok.apply_chat_template(CONV, tokenize=False)
    conv_ids = tok(rendered, add_special_tokens=False)["input_ids"]
    ids, mask = build_sequences([CONV], tok, seqlen=len(conv_ids), nsamples=1, return_loss_mask=True)
    assert ids[0].tolist() == conv_ids
    assert ids[0, 0].item() == tok.convert_tokens_to_ids("<|im_start|>")
    # the loss mask covers the assistant answer and its end-of-turn, nothing of the system/user turns
    assert tok.decode(ids[0][mask[0]]) == "Four.<|im_end|>\n"

    import copy

    base_tok = copy.deepcopy(tok)
    base_tok.chat_template = None
    assert build_sequences(["hello there"], base_tok, seqlen=2, nsamples=1).shape == (1, 2)
    with pytest.raises(ValueError, match="no chat template"):
        build_sequences([CONV], base_tok, seqlen=4, nsamples=1)


def test_repeats_with_warning_and_fails_without_tokens(tok):
    with pytest.warns(UserWarning, match="repeating"):
        seq = build_sequences(["one short text"], tok, seqlen=32, nsamples=4)
    assert seq.shape == (4, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough data: no warning
        build_sequences(_items(), tok, seqlen=8, nsamples=4)
    with pytest.raises(ValueError, match="no tokens"):
        build_sequences([], tok, seqlen=8, nsamples=2)


def test_seqlen_longer_than_model(tok, tiny_model, monkeypatch):
    with pytest.raises(ValueError, match="seqlen 9000.*8192"):
        build_sequences(_items(), tok, seqlen=9000, nsamples=1, model_max_length=8192)
    # calibration_data reads the limit from the model and checks it before generating anything
    monkeypatch.setattr(tiny_model, "generate", lambda **kw: pytest.fail("generated before checking seqlen"))
    with pytest.raises(ValueError, match="seqlen 512.*256"):
        calibration_data("self", tok, model=tiny_model, nsamples=2, seqlen=512)


def test_calibration_data_composes(tok, tmp_path):
    f = tmp_path / "c.jsonl"
    _write_jsonl(f, [{"text": t} for t in _items()[:-1]] + [{"messages": CONV}])
    seq = calibration_data(str(f), tok, nsamples=4, seqlen=12, seed=3)
    assert torch.equal(seq, build_sequences(load_texts(str(f)), tok, seqlen=12, nsamples=4, seed=3))
    ids, mask = calibration_data(str(f), tok, nsamples=4, seqlen=12, return_loss_mask=True)
    assert ids.shape == mask.shape == (4, 12)


# --------------------------------------------------------------------------------------------- Dataset

def test_token_block_dataset(tok):
    ids, mask = build_sequences(_items() + [CONV] * 5, tok, seqlen=24, nsamples=6, return_loss_mask=True)
    ds = TokenBlockDataset(ids, mask)
    assert len(ds) == 6
    item = ds[2]
    assert set(item) == {"input_ids", "attention_mask", "labels"}
    assert torch.equal(item["input_ids"], ids[2]) and bool(item["attention_mask"].eq(1).all())
    assert torch.equal(item["labels"] == -100, ~mask[2])
    assert torch.equal(item["labels"][mask[2]], ids[2][mask[2]])
    assert bool((~mask).any())  # the user/system turns really are masked somewhere
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 24)

    full = TokenBlockDataset(ids)
    assert torch.equal(full[2]["labels"], ids[2])
    with pytest.raises(ValueError, match="2-D"):
        TokenBlockDataset(ids[0])
    with pytest.raises(ValueError, match="shape"):
        TokenBlockDataset(ids, mask[:, :3])


def test_token_block_dataset_from_source(tok):
    ds = TokenBlockDataset.from_source([CONV] * 10, tok, nsamples=3, seqlen=20, assistant_only_loss=True)
    assert len(ds) == 3 and ds[0]["input_ids"].shape == (20,)
    labels = torch.stack([ds[i]["labels"] for i in range(3)])
    assert bool((labels == -100).any()) and bool((labels != -100).any())
    plain = TokenBlockDataset.from_source([CONV] * 10, tok, nsamples=3, seqlen=20)
    assert not bool((plain[0]["labels"] == -100).any())


def test_calibration_size_has_no_default_outside_the_config(tok):
    from upq_hf import UPQConfig

    with pytest.raises(TypeError, match="nsamples"):
        calibration_data(["some text"] * 4, tok)
    with pytest.raises(TypeError, match="nsamples"):
        TokenBlockDataset.from_source(["some text"] * 4, tok)
    assert (UPQConfig().data.calibration_samples, UPQConfig().data.calibration_seqlen) == (128, 128)
