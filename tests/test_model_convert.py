"""Export to stock Qwen3 / Qwen3-MoE and back: the architecture is Qwen3, so the numbers must agree.

Each case goes through the real CLI (scripts/convert_model.py), then compares logits and greedy
generations of our model with stock transformers code loading the exported directory, and checks
that export -> import gives back every tensor bit for bit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from model import MiniMindConfig, MiniMindForCausalLM

from conftest import REPO_ROOT as ROOT
from conftest import load_script

convert_model = load_script("convert_model")

VOCAB = 97
YARN = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 64}
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 1e4}

# (name, overrides): GQA ratio heads/kv = 1, 2, 4; tied and untied; default RoPE and YaRN; dense and MoE.
CASES = {
    "mha-tied-default": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                             rope_parameters=DEFAULT_ROPE),
    "gqa2-untied-yarn": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                             rope_parameters=YARN),
    "gqa4-tied-yarn": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
                           rope_parameters=YARN),
    "moe-gqa2-untied-default": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                    rope_parameters=DEFAULT_ROPE, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=48),
    "moe-gqa4-tied-yarn": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                               rope_parameters=YARN, num_experts=3, num_experts_per_tok=1,
                               moe_intermediate_size=32, norm_topk_prob=False),
}


def random_model(seed: int = 0, **overrides) -> MiniMindForCausalLM:
    """A ~0.1M-param model with weights large enough (std 0.15) that any mismatch shows in the logits."""
    fields = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                  max_position_embeddings=256, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(seed)
    m = MiniMindForCausalLM(MiniMindConfig(**{**fields, **overrides})).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.15 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return m


def export(m: MiniMindForCausalLM, tmp_path: Path) -> Path:
    src, dst = tmp_path / "ours", tmp_path / "qwen3"
    m.save_pretrained(src)
    assert convert_model.main(["export", str(src), str(dst)]) == 0
    return dst


def greedy(m, ids: torch.Tensor, n: int = 12) -> torch.Tensor:
    return m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_stock_qwen3_and_round_trips(case, tmp_path):
    ours = random_model(**CASES[case])
    dst = export(ours, tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(dst).eval()
    assert type(theirs).__name__ == ("Qwen3MoeForCausalLM" if ours.config.is_moe else "Qwen3ForCausalLM")

    torch.manual_seed(1)
    # 100 tokens: beyond YaRN's original 64 positions, where the interpolated frequencies matter.
    ids = torch.randint(1, VOCAB, (2, 100))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert (a - b).abs().max() <= 1e-4
    assert torch.equal(greedy(ours, ids[:1, :70]), greedy(theirs, ids[:1, :70]))

    assert convert_model.main(["import", str(dst), str(tmp_path / "back")]) == 0
    back = MiniMindForCausalLM.from_pretrained(tmp_path / "back")
    assert type(back) is MiniMindForCausalLM
    want, got = ours.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    if ours.config.tie_word_embeddings:
        assert back.lm_head.weight is back.model.embed_tokens.weight


CLEAN_LOADER = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    out = {}
    for path in sys.argv[1:-1]:
        m = AutoModelForCausalLM.from_pretrained(path).eval()
        ids = torch.load(path + "/ids.pt")
        with torch.no_grad():
            logits = m(ids).logits
        gen = m.generate(ids[:1, :40], max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
        torch.save({"logits": logits, "gen": gen}, path + "/theirs.pt")
        out[path] = type(m).__module__ + "." + type(m).__name__
    out["model_imported"] = any(name == "model" or name.startswith("model.") for name in sys.modules)
    json.dump(out, open(sys.argv[-1], "w"))
""")


def test_stock_transformers_loads_export_without_our_code(tmp_path):
    """A fresh interpreter that never imports `model` (our code) loads the exports with stock transformers."""
    cases = {"dense": random_model(seed=3, **CASES["gqa2-untied-yarn"]),
             "moe": random_model(seed=4, **CASES["moe-gqa4-tied-yarn"])}
    torch.manual_seed(5)
    ids = torch.randint(1, VOCAB, (2, 90))
    dirs = {}
    for name, m in cases.items():
        dirs[name] = export(m, tmp_path / name)
        torch.save(ids, dirs[name] / "ids.pt")
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-c", CLEAN_LOADER, *map(str, dirs.values()), str(report)],
                   cwd=tmp_path, check=True, capture_output=True, timeout=300)
    loaded = json.loads(report.read_text())
    assert loaded["model_imported"] is False
    assert loaded[str(dirs["dense"])] == "transformers.models.qwen3.modeling_qwen3.Qwen3ForCausalLM"
    assert loaded[str(dirs["moe"])] == "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeForCausalLM"
    for name, m in cases.items():
        theirs = torch.load(dirs[name] / "theirs.pt")
        with torch.no_grad():
            assert (m(ids).logits - theirs["logits"]).abs().max() <= 1e-4
        assert torch.equal(greedy(m, ids[:1, :40]), theirs["gen"])


def test_export_copies_tokenizer_and_generation_config(tmp_path):
    m = random_model()
    src = tmp_path / "ours"
    m.save_pretrained(src)
    (src / "tokenizer.json").write_text('{"fake": true}')
    (src / "tokenizer_config.json").write_text("{}")
    assert convert_model.main(["export", str(src), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_text() == '{"fake": true}'
    assert (out / "tokenizer_config.json").exists() and (out / "generation_config.json").exists()
    assert (out / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/convert_model.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_cli_unsupported_inputs_fail_in_one_line(tmp_path, capsys):
    """Exit code 2 and one line on stderr, never a traceback. One subprocess proves the real CLI path;
    the other cases call main() in-process to stay fast."""
    missing = run_cli("export", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().count("\n") == 0 and "no config.json" in missing.stderr

    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    bad = {
        "dropout": ("export", random_model(dropout=0.1), "dropout"),
        "sliding": ("import", Qwen3ForCausalLM(Qwen3Config(**small, use_sliding_window=True, sliding_window=8)),
                    "sliding"),
        "rope": ("import", Qwen3ForCausalLM(Qwen3Config(**small, rope_parameters={
            "rope_type": "linear", "rope_theta": 1e4, "factor": 2.0})), "rope_type"),
        "mixed-moe": ("import", Qwen3MoeForCausalLM(Qwen3MoeConfig(**small, num_experts=2, moe_intermediate_size=16,
                                                                   mlp_only_layers=[0])), "mlp_only_layers"),
    }
    for name, (command, m, expected) in bad.items():
        src = tmp_path / name
        m.save_pretrained(src)
        capsys.readouterr()
        assert convert_model.main([command, str(src), str(tmp_path / f"{name}-out")]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"convert_model.py {command}: error:") and err.count("\n") == 1, err
        assert expected in err, err
    # A different architecture, and a MiniMind checkpoint passed to `import`.
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    assert convert_model.main(["import", str(llama), str(tmp_path / "llama-out")]) == 2
    assert convert_model.main(["import", str(tmp_path / "dropout"), str(tmp_path / "x")]) == 2


def test_cli_help_documents_both_directions():
    result = run_cli("--help")
    assert result.returncode == 0 and "export" in result.stdout and "import" in result.stdout
