"""`upq eval`: lm-eval's MMLU and IFEval run offline from local files, plus our fidelity report.

The model is a tiny random Llama with the bundled tokenizer's vocabulary, quantized to UPQ INT2 and
saved; its scores mean nothing, so the checks are on the plumbing (the JSON has lm-eval's metric keys,
over the right rows) and on the scoring being lm-eval's own (a known answer scored through the
task's own ``process_results``).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from upq_hf import cli

DATA = Path(__file__).parent / "data"
MMLU_METRIC = "acc,none"
IFEVAL_METRICS = ("prompt_level_strict_acc,none", "inst_level_strict_acc,none",
                  "prompt_level_loose_acc,none", "inst_level_loose_acc,none")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """(dense teacher folder, UPQ INT2 folder) of a tiny Llama speaking the bundled tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import upq_hf
    from upq_hf.models import load_tokenizer

    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    root = tmp_path_factory.mktemp("eval-models")
    dense, int2 = root / "dense", root / "int2"
    model.save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    upq_hf.quantize_model(model, upq_hf.UPQConfig(bits=2, group_size=32), progress=False)
    model.save_pretrained(int2)
    tokenizer.save_pretrained(int2)
    return str(dense), str(int2)


@pytest.fixture(scope="module")
def cli_results(tiny_models, tmp_path_factory):
    dense, int2 = tiny_models
    out = tmp_path_factory.mktemp("eval-out") / "results.json"
    code = cli.main(["eval", int2, "--tasks", "mmlu,ifeval,fidelity",
                     "--data-files", f"mmlu={DATA / 'mmlu'}", "--data-files", f"ifeval={DATA / 'ifeval.jsonl'}",
                     "--teacher", dense, "--limit", "8", "--num-fewshot", "1", "--max-gen-toks", "32",
                     "--fidelity-tokens", "16", "--batch-size", "8", "--bootstrap-iters", "100",
                     "--threads", "1", "--output", str(out)])
    return code, out


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_eval_writes_lm_eval_metrics_and_fidelity(cli_results, tiny_models):
    code, out = cli_results
    assert code == 0
    assert [p.name for p in out.parent.iterdir()] == ["results.json"]  # no temporary file left behind
    data = json.loads(out.read_text())
    results = data["results"]

    # MMLU: lm-eval's mmlu_<subject> tasks for the 4 subjects in the file, grouped as lm-eval's mmlu
    subjects = sorted({row["subject"] for row in _rows(DATA / "mmlu" / "test.jsonl")})
    assert data["group_subtasks"]["mmlu"] == [f"mmlu_{s}" for s in subjects]
    acc = results["mmlu"][MMLU_METRIC]
    assert 0.0 <= acc <= 1.0 and math.isclose(acc * 8, round(acc * 8), abs_tol=1e-9)  # over the 8 rows
    assert sum(data["n-samples"][f"mmlu_{s}"]["effective"] for s in subjects) == 8
    assert all(data["n-shot"][f"mmlu_{s}"] == 1 for s in subjects)
    for s in subjects:
        assert math.isclose(results[f"mmlu_{s}"][MMLU_METRIC] * 2, round(results[f"mmlu_{s}"][MMLU_METRIC] * 2))

    # IFEval: 6 prompts carrying 7 instructions
    for key in IFEVAL_METRICS:
        assert 0.0 <= results["ifeval"][key] <= 1.0
    assert math.isclose(results["ifeval"]["prompt_level_strict_acc,none"] * 6,
                        round(results["ifeval"]["prompt_level_strict_acc,none"] * 6), abs_tol=1e-9)
    assert math.isclose(results["ifeval"]["inst_level_strict_acc,none"] * 7,
                        round(results["ifeval"]["inst_level_strict_acc,none"] * 7), abs_tol=1e-9)
    assert data["n-samples"]["ifeval"]["effective"] == 6
    assert data["configs"]["ifeval"]["generation_kwargs"]["max_gen_toks"] == 32

    # fidelity (ours), merged into the same results
    fid = results["fidelity"]
    assert 0.0 <= fid["top1"] <= 1.0 and fid["kl"] >= 0.0 and 0.0 <= fid["jsd"] <= math.log(2) + 1e-6
    assert fid["prompts"] == 8 and fid["tokens"] > 0 and fid["teacher"] == tiny_models[0]

    assert data["upq"]["quantization"]["bits"] == 2 and data["upq"]["local_data"]["mmlu"]["rows"] == 8


@pytest.fixture(scope="module")
def local_tasks():
    """lm-eval Task objects built from the fixture files, without any model."""
    from upq_hf.evaluation.harness import load_tasks
    from upq_hf.evaluation.local_tasks import build_task_specs

    manager, specs, _ = build_task_specs(["mmlu", "ifeval"], {"mmlu": str(DATA / "mmlu"),
                                                              "ifeval": str(DATA / "ifeval.jsonl")})
    mmlu, ifeval = load_tasks(manager, specs)
    return {task.task_name: task for task in mmlu.get_all_tasks()}, ifeval


def test_mmlu_uses_lm_evals_task_and_scoring(local_tasks):
    mmlu, _ = local_tasks
    task = mmlu["mmlu_astronomy"]
    docs = list(task.test_docs())
    assert [d["subject"] for d in docs] == ["astronomy", "astronomy"]
    assert [d["subject"] for d in task.fewshot_docs()] == ["astronomy"]  # dev rows of the same subject
    assert task.config.description == "The following are multiple choice questions (with answers) about astronomy.\n\n"
    doc = docs[0]  # "closest to the Sun": Mercury, answer 1
    assert task.doc_to_text(doc) == ("Which planet in our solar system is closest to the Sun?\n"
                                     "A. Venus\nB. Mercury\nC. Earth\nD. Mars\nAnswer:")
    right = [(-3.0, False), (-0.5, True), (-2.0, False), (-4.0, False)]
    wrong = [(-0.5, True), (-3.0, False), (-2.0, False), (-4.0, False)]
    assert task.process_results(doc, right)["acc"] == 1.0
    assert task.process_results(doc, wrong)["acc"] == 0.0


def test_ifeval_uses_lm_evals_instruction_checkers(local_tasks):
    _, task = local_tasks
    docs = {d["key"]: d for d in task.test_docs()}

    def strict(key, response):
        return task.process_results(docs[key], [response])["prompt_level_strict_acc"]

    assert strict(1, "hi sam, could i borrow your ladder on saturday? thanks!") is True
    assert strict(1, "Hi Sam, could I borrow your ladder on Saturday?") is False
    assert strict(2, "A white tower sweeps its beam across the dark sea.") is True
    assert strict(2, " ".join(["word"] * 45)) is False
    assert strict(3, "It is fun. It keeps you safe. It is good exercise.") is True
    assert strict(3, "It is fun, safe, and healthy.") is False
    assert strict(4, "* Wipe spills at once.\n* Wash dishes daily.\n* Put things back.") is True
    assert strict(4, "* Wipe spills at once.\n* Wash dishes daily.") is False
    both = task.process_results(docs[5], ["Summer, because it is warm."])
    assert both["inst_level_strict_acc"] == [False, False]
    # sentence counting runs NLTK's Punkt model (punkt_tab), available offline through ensure_punkt_tab
    assert strict(6, "Bread dries out. Its starch crystallizes over time.") is True
    assert strict(6, "Bread dries out") is False


def test_punkt_tab_is_written_from_the_package(tmp_path, monkeypatch):
    import nltk

    from upq_hf.evaluation.local_tasks import ensure_punkt_tab
    from upq_hf.models import cache_dir

    ours = str(cache_dir() / "nltk_data")  # where earlier tests may have put it
    monkeypatch.setenv("UPQ_CACHE", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", [p for p in nltk.data.path if p != ours])
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        pytest.skip("NLTK's punkt_tab is installed on this machine")
    except LookupError:
        pass
    folder = Path(ensure_punkt_tab())
    assert folder == tmp_path / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    assert sorted(p.name for p in folder.iterdir()) == ["abbrev_types.txt", "collocations.tab",
                                                        "ortho_context.tab", "sent_starters.txt"]
    from nltk.tokenize.punkt import PunktTokenizer

    text = "Dr. Smith went to Washington. He arrived at 5 p.m. on Friday! Was it fun? Yes."
    assert len(PunktTokenizer("english").tokenize(text)) == 4


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv,needles", [
    (["--tasks", "mmlu,no_such_task_xyz"], ["unknown task 'no_such_task_xyz'", "--data-files"]),
    (["--tasks", "mmlu", "--data-files", "mmlu=/nonexistent/mmlu.jsonl"],
     ["task 'mmlu' not found: /nonexistent/mmlu.jsonl", "--data-files mmlu=FILE_OR_DIR", "answer"]),
    (["--tasks", "mmlu", "--data-files", "ifeval=x.jsonl"], ["ifeval", "not in --tasks"]),
    (["--tasks", "mmlu", "--data-files", f"mmlu={DATA / 'mmlu' / 'test.jsonl'}", "--num-fewshot", "5"],
     ["needs a dev file"]),
    (["--tasks", "fidelity", "--output", str(DATA)], ["cannot write --output"]),
])
def test_bad_task_or_data_exits_2_with_one_line(capsys, argv, needles):
    code, _, err = run(capsys, "eval", *argv)
    lines = [line for line in err.splitlines() if line.startswith("upq: error")]
    assert code == 2 and len(lines) == 1
    for needle in needles:
        assert needle in lines[0]


def test_malformed_rows_are_named(tmp_path, capsys):
    rows = _rows(DATA / "mmlu" / "test.jsonl")
    rows[3]["choices"] = rows[3]["choices"][:3]
    bad = tmp_path / "mmlu.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code, _, err = run(capsys, "eval", "--tasks", "mmlu", "--data-files", f"mmlu={bad}")
    assert code == 2 and f"{bad}: row 3 has 3 choices" in err
    rows = _rows(DATA / "ifeval.jsonl")
    rows[0]["instruction_id_list"] = ["change_case:shouting"]
    bad = tmp_path / "ifeval.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code, _, err = run(capsys, "eval", "--tasks", "ifeval", "--data-files", f"ifeval={bad}")
    assert code == 2 and "unknown IFEval instruction(s) change_case:shouting" in err


def test_fidelity_alone_needs_no_lm_eval(tiny_models, tmp_path, monkeypatch):
    from upq_hf.evaluation import evaluate_model

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    dense, int2 = tiny_models
    out = evaluate_model(int2, "fidelity", teacher=dense, limit=2, fidelity_max_new_tokens=4, progress=False,
                         output=str(tmp_path / "f.json"))
    assert out["results"]["fidelity"]["prompts"] == 2 and out["upq"]["lm_eval_version"] is None
    assert json.loads((tmp_path / "f.json").read_text())["results"]["fidelity"]["tokens"] > 0
    with pytest.raises(ImportError, match=r"pip install 'upq_hf\[eval\]'"):
        evaluate_model(int2, "mmlu", data_files={"mmlu": str(DATA / "mmlu")})


def test_import_upq_hf_keeps_lm_eval_out():
    code = ("import sys, upq_hf, upq_hf.evaluation; from upq_hf import cli; cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lm_eval', 'nltk')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.stdout.strip() == "[]"
