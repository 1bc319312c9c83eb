"""PPO's pieces against hand-computed values and exact references (GAE, clipping, KL estimators,
entropy, whitening, running statistics, rollout masks), then a short CPU run of the PPO stage."""

from __future__ import annotations

import json
import math

import pytest
import torch

from trainer.lib.generation import Sampling, completion_mask_until_eos, generate
from trainer.lib.ppo import (AdaptiveKLController, RunningMeanStd, entropy_from_logits, explained_variance, gae, kl_k1,
                             kl_k3, masked_mean, per_token_rewards, policy_loss, token_logprobs, token_values,
                             value_loss, whiten)


def test_gae_hand_computed():
    # Row 0: three tokens, reward 1 at the end. gamma 0.9, lambda 0.8 (gamma * lambda = 0.72):
    #   delta_2 = 1 - 0.7 = 0.3                 A_2 = 0.3
    #   delta_1 = 0.9 * 0.7 - 0.6 = 0.03        A_1 = 0.03 + 0.72 * 0.3 = 0.246
    #   delta_0 = 0.9 * 0.6 - 0.5 = 0.04        A_0 = 0.04 + 0.72 * 0.246 = 0.21712
    # Row 1: two tokens then padding (whose reward and value must be ignored):
    #   delta_1 = 2 - 1 = 1, A_1 = 1;  delta_0 = 0.9 * 1 - 1 = -0.1, A_0 = -0.1 + 0.72 = 0.62
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 99.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.21712, 0.246, 0.3], [0.62, 1.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.71712, 0.846, 1.0], [1.62, 2.0, 0.0]]))


def test_gae_with_lambda_and_gamma_one_is_reward_to_go_minus_value():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.ones(3, 6)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = rewards.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(ret, to_go)
    torch.testing.assert_close(adv, to_go - values)


def test_per_token_rewards_put_the_score_on_the_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    r = per_token_rewards(torch.tensor([1.0, -1.0]), kl, mask, kl_coef=0.1)
    torch.testing.assert_close(r, torch.tensor([[-0.01, -0.02, 1.0 - 0.03], [-0.05, -1.05, 0.0]]))


def _grad_of_policy_loss(ratio: float, advantage: float, clip: float = 0.2):
    old = torch.tensor([[0.0]])
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    out = policy_loss(logp, old, torch.tensor([[advantage]]), torch.ones(1, 1), clip)
    out.loss.backward()
    return logp.grad.item(), out


@pytest.mark.parametrize("ratio, advantage, clipped", [
    (1.5, 1.0, True),     # already pushed up past 1 + eps for a good action: no more push
    (0.5, -1.0, True),    # already pushed down past 1 - eps for a bad action
    (1.1, 1.0, False),    # inside the range
    (0.9, -1.0, False),
    (0.5, 1.0, False),    # outside, but moving back towards the range is allowed (pessimistic min)
    (1.5, -1.0, False),
])
def test_clipped_surrogate_gradient(ratio, advantage, clipped):
    grad, out = _grad_of_policy_loss(ratio, advantage)
    if clipped:
        assert grad == 0.0 and out.clip_fraction == 1.0
    else:
        # d/dlogp of -A * exp(logp - old) = -A * ratio
        assert grad == pytest.approx(-advantage * ratio) and out.clip_fraction == 0.0
    assert out.approx_kl == pytest.approx((ratio - 1) - math.log(ratio))


def test_policy_loss_averages_over_real_tokens_only():
    logp = torch.zeros(1, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0]])
    out = policy_loss(logp, torch.zeros(1, 4), torch.tensor([[1.0, 3.0, 100.0, 100.0]]), mask)
    assert out.loss.item() == pytest.approx(-2.0)
    out.loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, -1.5, 0.0, 0.0]]))


def test_value_loss_clipping():
    old, ret, mask = torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.ones(1, 1)

    def run(v0: float):
        v = torch.tensor([[v0]], requires_grad=True)
        loss, frac = value_loss(v, old, ret, mask, clip=0.2)
        loss.backward()
        return loss.item(), frac, v.grad.item()

    # Within +-0.2 of the old value: plain 0.5 * (V - G)^2, gradient V - G.
    assert run(0.1) == pytest.approx((0.5 * 0.81, 0.0, -0.9))
    # Moved away from the target: the unclipped error is the larger one, so it is kept (gradient flows).
    assert run(-0.5) == pytest.approx((0.5 * 2.25, 0.0, -1.5))
    # Moved 0.5 towards the target in one go: the clipped value 0.2 has the larger error (0.64 > 0.25),
    # the max picks that constant branch and the gradient is zero.
    assert run(0.5) == pytest.approx((0.5 * 0.64, 1.0, 0.0))


def test_kl_estimators_against_exact_kl():
    p = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    q = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])
    exact = (p * (p / q).log()).sum().item()
    g = torch.Generator().manual_seed(0)
    a = torch.multinomial(p, 400_000, replacement=True, generator=g)
    logp, logq = p.log()[a], q.log()[a]
    k1, k3 = kl_k1(logp, logq), kl_k3(logp, logq)
    for k in (k1, k3):
        stderr = k.std().item() / math.sqrt(len(k))
        assert abs(k.mean().item() - exact) < 4 * stderr, (k.mean().item(), exact)
    assert (k3 >= 0).all() and (k1 < 0).any()
    assert k3.var() < k1.var()  # here, where p is close to q
    # Exactly: sum_a p(a) k(a) equals KL for both.
    support = torch.arange(5)
    assert (p * kl_k1(p.log()[support], q.log()[support])).sum().item() == pytest.approx(exact, abs=1e-6)
    assert (p * kl_k3(p.log()[support], q.log()[support])).sum().item() == pytest.approx(exact, abs=1e-6)


def test_entropy_from_logits_matches_torch():
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(1)) * 3
    torch.testing.assert_close(entropy_from_logits(logits), torch.distributions.Categorical(logits=logits).entropy())


def test_whiten_and_masked_mean_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 1000.0], [4.0, 5.0, -1000.0, -1000.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(3.0)
    w = whiten(x, mask)
    real = w[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert real.var().item() == pytest.approx(1.0, abs=1e-4)
    assert (w[~mask.bool()] == 0).all()
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0  # empty mask: 0, not NaN


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask) == pytest.approx(0.0)


def test_running_mean_std_matches_all_data():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, generator=g) * 3 + 2 for n in (5, 17, 1, 40)]
    rms = RunningMeanStd(eps=0.0)
    for b in batches:
        rms.update(b)
    everything = torch.cat(batches).double()
    assert rms.mean == pytest.approx(everything.mean().item())
    assert rms.var == pytest.approx(everything.var(unbiased=False).item())
    assert rms.count == len(everything)


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    ctl.update(current_kl=2.0, n_steps=10)        # too much KL: error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    ctl.update(current_kl=0.9, n_steps=10)        # a little too little: -0.1
    assert ctl.value == pytest.approx(0.1 * (1 - 0.1 * 10 / 100))


def test_completion_mask_until_eos():
    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 7, 2, 0], [5, 6, 7, 8, 9]])
    mask, finished = completion_mask_until_eos(ids, eos_id=2)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert finished.tolist() == [True, True, False]


def test_rollout_logprobs_and_values_ignore_left_padding(rl_models):
    """Batched (left-padded prompts, right-padded completions) log-probs and values equal those
    computed one unpadded sequence at a time."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rl_models["policy"])
    lm = AutoModelForCausalLM.from_pretrained(rl_models["policy"]).eval()
    critic = AutoModelForSequenceClassification.from_pretrained(rl_models["reward"]).eval()
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}],
               [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Tom has 23 apples. Mia gives him 45 more. How many apples does Tom have?"}]]
    torch.manual_seed(0)
    r = generate(lm, tok, prompts, max_new_tokens=6, sampling=Sampling(temperature=1.0))
    assert r.input_ids.shape[1] == r.prompt_length + r.completion_mask.shape[1]
    with torch.no_grad():
        logp, _ = token_logprobs(lm, r)
        values = token_values(critic, r)
        for i in range(2):
            ids = r.input_ids[i][r.attention_mask[i].bool()][None]
            n = int(r.attention_mask[i, :r.prompt_length].sum())
            c = int(r.completion_mask[i].sum())
            ref = torch.log_softmax(lm(ids).logits[0, n - 1:-1], -1).gather(-1, ids[0, n:, None])[:, 0]
            torch.testing.assert_close(logp[i, :c], ref, atol=1e-5, rtol=1e-5)
            ref_v = critic.token_values(ids)[0, n - 1:-1]
            torch.testing.assert_close(values[i, :c], ref_v, atol=1e-5, rtol=1e-5)


def test_ppo_stage_runs_and_saves(rl_models, rl_events, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from trainer.train_6_ppo import main

    out = tmp_path / "out"
    ckpt = main(["--out_dir", str(out), "--init_from", str(rl_models["policy"]),
                 "--reward_model", str(rl_models["reward"]), "--data", str(rl_models["rl_train"]),
                 "--eval_data", str(rl_models["rl_eval"]), "--max_steps", "2", "--batch_size", "4",
                 "--samples_per_prompt", "2", "--mini_batch_size", "2", "--max_completion_length", "8",
                 "--max_eval_prompts", "4", "--rule_reward", "correctness", "--kl_target", "1.0"])
    assert ckpt == out / "ppo" / "checkpoint-2"
    # 4 prompts x 2 samples = 8 rollouts a step; the report counts rollouts.
    assert json.loads((out / "ppo" / "seen.json").read_text())["samples"] == 2 * 8
    assert isinstance(AutoModelForCausalLM.from_pretrained(ckpt), torch.nn.Module)
    assert AutoModelForSequenceClassification.from_pretrained(ckpt / "critic").config.num_labels == 1
    assert (ckpt / "ppo_state.pt").is_file() and (ckpt / "tokenizer.json").is_file()
    scalars = rl_events(out / "ppo" / "runs")
    for tag in ("train/reward_model_score", "train/kl", "train/kl_coef", "train/policy_loss", "train/value_loss",
                "train/clip_fraction", "train/approx_kl", "train/entropy", "train/explained_variance",
                "train/completion_length", "train/rule_reward", "eval/rm_score", "eval/accuracy"):
        assert tag in scalars, tag
    assert [s for s, _ in scalars["train/policy_loss"]] == [1, 2]
    assert [s for s, _ in scalars["eval/rm_score"]] == [0, 2]

    metrics = json.loads((out / "ppo" / "metrics.json").read_text())
    assert set(metrics) == {"rm_score", "accuracy"} and metrics["rm_score"]["higher_is_better"] is True
    assert metrics["rm_score"]["after"] == pytest.approx(scalars["eval/rm_score"][-1][1])
    acc = metrics["accuracy"]  # a share of the 4 held-out prompts: stored with its binomial standard error
    assert acc["n"] == 4 and "n" not in metrics["rm_score"]
    assert acc["after_stderr"] == pytest.approx((acc["after"] * (1 - acc["after"]) / 4) ** 0.5)


KILLING_REWARD = """
import os, signal

calls = 0


def digit_share(prompts, completions, **columns):
    \"\"\"Share of digits in each completion; SIGKILLs this process on call $PPO_KILL_AT (a crash mid-step).\"\"\"
    global calls
    calls += 1
    if os.environ.get("PPO_KILL_AT") == str(calls):
        os.kill(os.getpid(), signal.SIGKILL)
    return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in completions]
"""


def test_ppo_resume_after_sigkill_equals_an_uninterrupted_run(rl_models, tmp_path):
    """Killed during step 4 (latest checkpoint: 2), `--resume` must end with the very weights, optimizer
    and KL state of a run that never stopped: models, optimizers, schedulers, reward statistics and the
    sampler's RNG all come back. Both runs are subprocesses with one thread, so only the resume differs."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from conftest import REPO_ROOT

    (tmp_path / "killing_reward.py").write_text(KILLING_REWARD)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("PPO_KILL_AT", None)

    def run(out, *extra, kill_at=None):
        cmd = [sys.executable, "trainer/train_6_ppo.py", "--out_dir", str(out), "--init_from", str(rl_models["policy"]),
               "--reward_model", str(rl_models["reward"]), "--data", str(rl_models["rl_train"]), "--eval_data",
               str(rl_models["rl_eval"]), "--max_steps", "4", "--save_steps", "2", "--eval_steps", "100",
               "--batch_size", "4", "--samples_per_prompt", "1", "--mini_batch_size", "2", "--max_completion_length", "8",
               "--max_eval_prompts", "2", "--lr", "1e-3", "--kl_target", "1.0", "--rule_reward", "killing_reward:digit_share", *extra]
        return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                              env={**env, **({"PPO_KILL_AT": str(kill_at)} if kill_at else {})})

    full = run(tmp_path / "a")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run(tmp_path / "b", kill_at=4)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "b" / "ppo").glob("checkpoint-*")) == ["checkpoint-2"]
    resumed = run(tmp_path / "b", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a, b = tmp_path / "a" / "ppo" / "checkpoint-4", tmp_path / "b" / "ppo" / "checkpoint-4"
    for name in ("model.safetensors", "critic/model.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    sa, sb = (torch.load(d / "ppo_state.pt", weights_only=True) for d in (a, b))
    assert sa["kl_coef"] == sb["kl_coef"] and sa["reward_stats"] == sb["reward_stats"] and sa["step"] == 4
    for oa, ob in zip(sa["optimizers"], sb["optimizers"]):
        assert all(torch.equal(oa["state"][i]["exp_avg_sq"], ob["state"][i]["exp_avg_sq"]) for i in oa["state"])
    start = load_file(tmp_path / "b" / "ppo" / "checkpoint-4" / "model.safetensors")
    assert any(not torch.equal(start[k], v) for k, v in load_file(rl_models["policy"] / "model.safetensors").items())


def test_ppo_stage_under_torchrun_two_processes(rl_models, torchrun, tmp_path):
    """The hand-written PPO loop shards prompts over two gloo processes, keeps them in step and exits cleanly."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    output = torchrun("trainer/train_6_ppo.py", "--out_dir", str(out), "--init_from", str(rl_models["policy"]),
                      "--reward_model", str(rl_models["reward"]), "--data", str(rl_models["rl_train"]),
                      "--eval_data", str(rl_models["rl_eval"]), "--max_steps", "2", "--batch_size", "4",
                      "--samples_per_prompt", "1", "--mini_batch_size", "2", "--max_completion_length", "8",
                      "--max_eval_prompts", "4", "--lr", "1e-3")
    assert "(16 on each of 2 processes)" in output
    ckpt = out / "ppo" / "checkpoint-2"
    trained = AutoModelForCausalLM.from_pretrained(ckpt).state_dict()
    start = AutoModelForCausalLM.from_pretrained(rl_models["policy"]).state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # the actor was updated
    assert output.count("saved ") == 1  # rank 0 alone writes the checkpoint


TOY_REWARD = '''
def digit_share(prompts, completions, **columns):
    """Share of the completion's non-space characters that are digits."""
    out = []
    for text in completions:
        chars = [ch for ch in text if not ch.isspace()]
        out.append(sum(ch.isdigit() for ch in chars) / max(len(chars), 1))
    return out
'''


def test_ppo_learns_a_rule_reward(rl_models, rl_events, tmp_path, monkeypatch):
    """End to end, the hand-written PPO must climb a reward it can reach: an untrained model writes ~2%
    digits; rewarded for digits (a custom `--rule_reward module:function`), it must write clearly more.
    A sign error in the surrogate, the advantages or the reward plumbing makes the share fall or stay."""
    (tmp_path / "toy_reward.py").write_text(TOY_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    from trainer.train_6_ppo import main

    out = tmp_path / "out"
    main(["--out_dir", str(out), "--init_from", str(rl_models["policy"]), "--reward_model", str(rl_models["reward"]),
          "--data", str(rl_models["rl_train"]), "--eval_data", str(rl_models["rl_eval"]), "--max_steps", "40",
          "--batch_size", "16", "--samples_per_prompt", "1", "--mini_batch_size", "8", "--max_completion_length", "8",
          "--max_eval_prompts", "4",
          "--eval_steps", "1000", "--lr", "3e-3", "--kl_coef", "0", "--rule_reward", "toy_reward:digit_share",
          "--rule_reward_weight", "100"])  # the weight drowns the untrained reward model's (normalised) noise
    share = [v for _, v in rl_events(out / "ppo" / "runs")["train/rule_reward"]]
    assert len(share) == 40
    first, last = sum(share[:10]) / 10, sum(share[-10:]) / 10
    assert first < 0.05 and last > first + 0.05, (first, last)
