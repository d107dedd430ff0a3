"""lm-evaluation-harness on spiking models (docs/integrations.md): local tasks written here (a
multiple-choice loglikelihood task, a rolling-loglikelihood perplexity task and a generation
task over JSONL files; nothing is downloaded) run on the embedded model through ``spikeops
lm-eval`` and through lm_eval's ``spikeops`` model type, and every log-likelihood, metric and
generated text is checked against the same computation done with the model's own forward."""

import importlib.util
import json
import math
import re
import subprocess
import sys

import pytest
import torch

import spikeops
from spikeops.calibrate import parse_encoding
from spikeops.commands import DEFAULT_MODEL, load_calibration
from spikeops.evaluate import decode_tokens, encode_text, generate

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                reason="needs the lm_eval package (pip install 'spikeops[eval]')")

PREFIX = 10  # the byte-level model has no BOS/EOS: a newline starts every text
# Contexts end without whitespace: lm_eval moves a context's trailing spaces into the
# continuation (TemplateLM._encode_pair), which the computation here does not repeat.
MC = [{"question": "def add(a, b):\n    return a", "choices": [" + b", " * q", "?)"], "answer": 0},
      {"question": "import", "choices": [" os", " zq", "  "], "answer": 0},
      {"question": "for i in", "choices": [" xx(((:", " range(10):"], "answer": 1},
      {"question": "    return", "choices": [" None\n", "!!!!"], "answer": 0}]
TEXTS = [{"text": "def f(x):\n    return x + 1\n"}, {"text": "class A:\n    pass\n"},
         {"text": "if __name__ == '__main__':\n    main()\n"}]
GEN = [{"prompt": "def main(", "target": "):"}, {"prompt": "import o", "target": "s"}]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Three task YAMLs over local JSONL files, and lm_eval kept offline."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, rows in (("mc", MC), ("ppl", TEXTS), ("gen", GEN)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = lambda name: (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
                         f"{root / name}.jsonl\n  cache_dir: {root / 'cache'}\ntest_split: test\n")
    (root / "mc.yaml").write_text(
        "task: spk_mc\n" + data("mc") + "output_type: multiple_choice\ndoc_to_text: question\n"
        "doc_to_choice: choices\ndoc_to_target: answer\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n")
    (root / "ppl.yaml").write_text(
        "task: spk_ppl\n" + data("ppl") + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: text\nmetric_list:\n  - metric: word_perplexity\n"
        "  - metric: bits_per_byte\n")
    (root / "gen.yaml").write_text(
        "task: spk_gen\n" + data("gen") + "output_type: generate_until\ndoc_to_text: prompt\n"
        "doc_to_target: target\ntarget_delimiter: ''\ngeneration_kwargs:\n  until: [\"\\n\"]\n"
        "  max_gen_toks: 6\nmetric_list:\n  - metric: exact_match\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        yield root


def own_model(spec):
    calibration = load_calibration(DEFAULT_MODEL)
    return spikeops.load_gptq(DEFAULT_MODEL, parse_encoding(spec, calibration),
                              calibration=calibration)


@torch.no_grad()
def loglikelihood(model, context: str, continuation: str, prefix=()) -> float:
    """log p(continuation | context) from one forward of the model, in float64."""
    ctx = list(prefix) + encode_text(context).tolist()
    ids = torch.tensor(ctx + encode_text(continuation).tolist())
    logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)
    positions = torch.arange(len(ctx) - 1, len(ids) - 1)
    return float(logp[positions, ids[len(ctx):]].sum())


def expected(model):
    """Every request's log-likelihood and the tasks' metrics, computed here."""
    mc = [[loglikelihood(model, d["question"], c) for c in d["choices"]] for d in MC]
    acc = sum(max(range(len(ll)), key=ll.__getitem__) == d["answer"]
              for ll, d in zip(mc, MC)) / len(MC)
    rolling = [loglikelihood(model, "", d["text"], prefix=[PREFIX]) for d in TEXTS]
    # lm_eval's word count (Task.count_words): the pieces of re.split(r"\s+", text).
    words = sum(len(re.split(r"\s+", d["text"])) for d in TEXTS)
    nbytes = sum(len(d["text"].encode()) for d in TEXTS)
    return mc, rolling, {"acc": acc, "word_perplexity": math.exp(-sum(rolling) / words),
                         "bits_per_byte": -sum(rolling) / nbytes / math.log(2)}


def check_metrics(results, want):
    got = {"acc": results["spk_mc"]["acc,none"],
           "word_perplexity": results["spk_ppl"]["word_perplexity,none"],
           "bits_per_byte": results["spk_ppl"]["bits_per_byte,none"]}
    assert got["acc"] == want["acc"]
    for key in ("word_perplexity", "bits_per_byte"):
        assert got[key] == pytest.approx(want[key], rel=1e-4), key


def test_command_passes_lm_evals_arguments_through(tasks, tmp_path, capsys, monkeypatch):
    """``spikeops lm-eval ARGS``: lm_eval's own options (model_args, tasks, include_path,
    batch_size, output_path), ``--model spikeops`` and (no CUDA) ``--device cpu`` added;
    lm_eval's table, and results whose metrics are those of the model's own forward and whose
    config holds the run's spikes."""
    from spikeops.cli import main
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "results"
    assert main(["lm-eval", "--model_args", f"pretrained={DEFAULT_MODEL},encoding=absmax4,"
                 f"prefix_token_id={PREFIX}", "--tasks", "spk_mc,spk_ppl", "--include_path",
                 str(tasks), "--batch_size", "3", "--output_path", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "spikeops (" in printed and "spk_mc" in printed
    written = json.loads(next(out.rglob("results_*.json")).read_text())
    assert (written["config"]["model"], written["config"]["device"]) == ("spikeops", "cpu")
    _, _, want = expected(own_model("absmax4"))
    check_metrics(written["results"], want)
    spikes = written["config"]["spikeops"]
    assert spikes["encoding"] == "absmax4" and 0 < spikes["firing_rate"] < 1
    assert spikes["sops_per_mac"] > 0


def test_command_help_and_refusals(tasks, capsys, monkeypatch):
    """Its --help explains the pass-through without importing lm_eval; after "--", --help is
    lm_eval's; an argument lm_eval refuses gives lm_eval's usage error and exit status 2; the
    model's refusal and a missing lm_eval are one line."""
    from spikeops.cli import main
    code = ("import sys; from spikeops.cli import main; main(['lm-eval', '--help']); "
            "sys.exit('lm_eval' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    words = " ".join(run.stdout.split())
    assert run.returncode == 0 and "adds '--model spikeops'" in words and \
        "'spikeops lm-eval -- --help'" in words, run.stdout + run.stderr
    assert main(["lm-eval", "--", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lm-eval run") and "--include_path" in out, out
    assert main(["lm-eval", "--tasks", "spk_mc", "--limit", "many"]) == 2
    err = capsys.readouterr().err
    assert "--limit" in err and "many" in err, err
    assert main(["lm-eval", "--model_args", "pretrained=/nonexistent,encoding=absmax4",
                 "--tasks", "spk_mc", "--include_path", str(tasks), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("spikeops lm-eval: error: SpikeopsLM: pretrained must be a checkpoint "
                          "folder"), err
    monkeypatch.setitem(sys.modules, "lm_eval.__main__", None)  # import fails
    assert main(["lm-eval", "--tasks", "spk_mc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spikeops lm-eval: error: needs the lm_eval package") and \
        len(err.splitlines()) == 1, err


def test_model_type_by_name_with_a_per_type_encoding(tasks):
    """lm_eval's own entry, ``model="spikeops"`` with model_args as on lm_eval's command line
    (a per-layer-type encoding included): every request's log-likelihood is the model's."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import spikeops.lm_eval_model  # noqa: F401  (registers the model type)
    spec = "down_proj=minmax8;*=absmax4"
    results = lm_eval.simple_evaluate(
        model="spikeops", model_args=f"pretrained={DEFAULT_MODEL},encoding={spec},"
        f"prefix_token_id={PREFIX},batch_size=2", tasks=["spk_mc", "spk_ppl"],
        task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    mc, rolling, want = expected(own_model(spec))
    check_metrics(results["results"], want)
    got_mc = {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in results["samples"]["spk_mc"]}
    got_rolling = {s["doc_id"]: s["resps"][0][0] for s in results["samples"]["spk_ppl"]}
    flat = lambda rows: [x for row in rows for x in row]  # noqa: E731
    for got, want in ((flat(got_mc[i] for i in range(len(MC))), flat(mc)),
                      ([got_rolling[i] for i in range(len(TEXTS))], rolling)):
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                                   torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-4)


def test_generation_task(tasks):
    """generate_until on the byte-level model (no end-of-text token): greedy text up to the
    task's stop string, as spikeops' own generate gives it."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from spikeops.lm_eval_model import SpikeopsLM
    lm = SpikeopsLM(encoding="minmax8", prefix_token_id=PREFIX, batch_size=2)
    results = lm_eval.simple_evaluate(model=lm, tasks=["spk_gen"], log_samples=True,
                                      task_manager=TaskManager(include_path=str(tasks)))
    model = own_model("minmax8")
    for sample in results["samples"]["spk_gen"]:
        prompt = GEN[sample["doc_id"]]["prompt"]
        want = decode_tokens(generate(model, encode_text(prompt), 6, stop=(10,)))
        assert sample["resps"][0][0] == want


def test_refusals():
    from spikeops.lm_eval_model import SpikeopsLM
    with pytest.raises(ValueError, match="records no spike encoding"):
        SpikeopsLM(prefix_token_id=PREFIX)  # the embedded model's config records none
    with pytest.raises(ValueError, match="prefix_token_id"):
        SpikeopsLM(encoding="absmax4")
    with pytest.raises(ValueError, match="calibration"):
        SpikeopsLM(encoding="absmax4", calibration="latest")
    with pytest.raises(ValueError, match="spiky4"):
        SpikeopsLM(encoding="spiky4")
    with pytest.raises(ValueError, match="checkpoint folder"):
        SpikeopsLM("/nonexistent/folder", encoding="absmax4")


def test_import_spikeops_does_not_import_lm_eval():
    code = "import sys, spikeops; sys.exit('lm_eval' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
