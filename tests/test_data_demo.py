"""The demo world: deterministic, held-out splits that are really disjoint, answers that check out."""

import json
import math
import re

import pytest

from dataset.demo import (
    _eq,
    COLOURS,
    NAMES,
    OBJECTS,
    PLACES,
    SKILLS,
    DemoSizes,
    extract_answer,
    reward_pairs,
    rl_prompts,
    skill_of,
    split_of,
    _shared,
    tokenizer_corpus,
    unigram_entropy,
    word_tokens,
    write_demo_data,
)

SMALL = DemoSizes(pretrain_train=60, pretrain_eval=20, sft_train=80, sft_eval=20,
                  dpo_train=40, dpo_eval=10, reward_train=30, reward_eval=10, rl_train=30, rl_eval=10)
# A two-number equation "a op b = c" (not the tail of a chain such as "4 + 2 + 1 = 7").
EQ = re.compile(r"(?<![+-] )\b(\d+) ([+-]) (\d+) = (\d+)\b")
CHAIN = re.compile(r"\b(\d+(?: [+-] \d+)+) = (\d+)\b")
FACT = re.compile(rf"\b({'|'.join(NAMES)}) has an? ({'|'.join(COLOURS)}) ({'|'.join(OBJECTS)})\b")


def _jsonl(path):
    return [json.loads(line) for line in path.open(encoding="utf-8")]


def _keys(text: str) -> set:
    """Every arithmetic step ``(op, a, b)`` written in ``text`` (addition unordered)."""
    out = set()
    for a, op, b, _ in EQ.findall(text):
        a, b = int(a), int(b)
        out.add(("add", min(a, b), max(a, b)) if op == "+" else ("sub", a, b))
    return out


def _equations_true(text: str) -> bool:
    """Every equation in ``text`` holds, column steps ("12 - 7 = 5", "4 + 2 + 1 = 7") included."""
    def value(chain: str) -> int:
        tokens = chain.split()
        return int(tokens[0]) + sum(int(x) * (1 if op == "+" else -1) for op, x in zip(tokens[1::2], tokens[2::2]))
    return all(value(chain) == int(c) for chain, c in CHAIN.findall(text))


def _user_texts(records, key="conversations"):
    """The first user turn of each record: the prompt that carries the numbers and facts
    (follow-up turns such as "Now add 12 to that." are shared on purpose)."""
    return {next(m["content"] for m in r[key] if m["role"] == "user") for r in records}


@pytest.mark.parametrize("text, expected", [
    ("23 + 45 = 68. The answer is 68.", "68"),
    ("Mia went to the zoo. The answer is the zoo.", "the zoo"),
    ("The answer is 5. No wait. The answer is 7.", "7"),
    ("the answer is 3.5.", "3.5"),
    ("The answer is 12. Bye.", "12"),
    ("I think it is 68.", None),
    ("The answer is", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_unigram_entropy_matches_hand_computation():
    assert unigram_entropy(["a b c d"]) == pytest.approx(math.log(4))
    assert unigram_entropy(["a a a"]) == pytest.approx(0.0)
    p = 2 / 3
    assert unigram_entropy(["a a b"], tokenize=str.split) == pytest.approx(-p * math.log(p) - (1 - p) * math.log(1 - p))
    assert word_tokens("Tom has 23 apples.") == ["Tom", "has", "2", "3", "apples", "."]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = write_demo_data(tmp_path / "a", SMALL)
    b = write_demo_data(tmp_path / "b", SMALL)
    c = write_demo_data(tmp_path / "c", DemoSizes(**{**SMALL.__dict__, "seed": 1}))
    assert set(a) == {f"{s}_{p}" for s in ("pretrain", "sft", "dpo", "reward", "rl") for p in ("train", "eval")}
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes()
        assert a[name].read_bytes() != c[name].read_bytes()
        assert a[name].name == f"{name}.jsonl"


def test_write_is_idempotent_and_rewrites_when_sizes_change(tmp_path):
    paths = write_demo_data(tmp_path, SMALL)
    stamp = {n: p.stat().st_mtime_ns for n, p in paths.items()}
    paths["sft_train"].write_text("tampered\n")
    write_demo_data(tmp_path, SMALL)
    assert paths["sft_train"].read_text() == "tampered\n"
    assert paths["rl_eval"].stat().st_mtime_ns == stamp["rl_eval"]
    bigger = DemoSizes(**{**SMALL.__dict__, "sft_train": 90})
    write_demo_data(tmp_path, bigger)
    assert len(_jsonl(paths["sft_train"])) == 90


def test_default_sizes_fit_the_cpu_budget(data_demo_dir):
    texts = [r["text"] for r in _jsonl(data_demo_dir["pretrain_train"])]
    n_tokens = sum(len(word_tokens(t)) for t in texts)
    assert 400_000 <= n_tokens <= 700_000
    assert 6000 <= len(_jsonl(data_demo_dir["sft_train"])) <= 10_000
    assert len(_jsonl(data_demo_dir["dpo_train"])) == 3000 and len(_jsonl(data_demo_dir["rl_train"])) == 2000
    assert len(_jsonl(data_demo_dir["reward_train"])) == 3000
    assert all(200 <= len(_jsonl(data_demo_dir[f"{s}_eval"])) <= 500 for s in ("pretrain", "sft", "dpo", "reward", "rl"))
    vocab = {w for t in texts for w in word_tokens(t)}
    assert len(vocab) < 200
    assert 2.0 < unigram_entropy(texts) < 5.0


def test_train_and_eval_are_disjoint(data_demo_dir):
    load = {name: _jsonl(path) for name, path in data_demo_dir.items()}
    for stage in ("sft", "rl"):
        assert not _user_texts(load[f"{stage}_train"]) & _user_texts(load[f"{stage}_eval"])
    for stage in ("dpo", "reward"):
        assert not _user_texts(load[f"{stage}_train"], "chosen") & _user_texts(load[f"{stage}_eval"], "chosen")

    def chat_text(records):
        return " ".join(m["content"] for r in records for m in r["conversations"])

    train_text = chat_text(load["sft_train"]) + " ".join(r["text"] for r in load["pretrain_train"])
    eval_text = chat_text(load["sft_eval"]) + " ".join(r["text"] for r in load["pretrain_eval"])
    train_keys, eval_keys = _keys(train_text), _keys(eval_text)
    # One-digit facts ("7 + 5") are shared by design (dataset.demo._shared); every other step is split.
    assert len(eval_keys) > 500 and all(_shared(k) for k in train_keys & eval_keys)
    eval_keys = {k for k in eval_keys if not _shared(k)}
    train_facts, eval_facts = set(FACT.findall(train_text)), set(FACT.findall(eval_text))
    assert len(eval_facts) > 30 and not train_facts & eval_facts
    assert all(split_of("add", *k[1:]) == "eval" for k in eval_keys if k[0] == "add")


def test_every_sft_answer_is_formatted_and_correct(data_demo_dir):
    for path in (data_demo_dir["sft_train"], data_demo_dir["sft_eval"]):
        n_multi = n_system = 0
        records = _jsonl(path)
        for record in records:
            msgs = record["conversations"]
            n_system += msgs[0]["role"] == "system"
            n_multi += sum(m["role"] == "user" for m in msgs) > 1
            for i, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                answer = extract_answer(m["content"])
                assert answer is not None, m["content"]
                assert m["content"].endswith(f"The answer is {answer}.")
                eqs = EQ.findall(m["content"])
                if eqs:
                    assert _equations_true(m["content"]), m["content"]
                    assert eqs[-1][3] == answer
                else:
                    context = " ".join(x["content"] for x in msgs[:i] if x["role"] == "user")
                    assert answer in context and answer in (*NAMES, *COLOURS, *PLACES)
                    assert msgs[i - 1]["role"] == "user"
        assert 0.1 < n_multi / len(records) < 0.25
        assert 0.03 < n_system / len(records) < 0.15


def test_dpo_chosen_is_right_and_rejected_is_wrong(data_demo_dir):
    records = _jsonl(data_demo_dir["dpo_train"])
    broken_format = n_line_slips = 0
    for r in records:
        chosen, rejected = r["chosen"][-1]["content"], r["rejected"][-1]["content"]
        assert r["chosen"][:-1] == r["rejected"][:-1] and chosen != rejected
        good = extract_answer(chosen)
        assert good is not None and _equations_true(chosen)
        bad = extract_answer(rejected)
        if bad is None:
            broken_format += 1
            continue
        assert bad != good
        prompt = r["chosen"][0]["content"]
        if EQ.search(rejected):
            wrong_op = not any(op in prompt for op in (f"{a} {o} {b}" for a, o, b, _ in EQ.findall(rejected)))
            # or a slip in writing the answer down: every step right, the answer line not the result
            line_slip = rejected.rpartition(" The answer is")[0] == chosen.rpartition(" The answer is")[0]
            assert not _equations_true(rejected) or wrong_op or line_slip, rejected
            if line_slip:
                n_line_slips += 1
                assert EQ.findall(rejected)[-1][3] == good and abs(int(bad) - int(good)) in (1, 10)
    assert 0.05 < broken_format / len(records) < 0.3
    assert 0.1 < n_line_slips / len(records) < 0.5


def _chain_value(question: str) -> int:
    tokens = re.search(r"(\d+(?: [+-] \d+)+)", question).group(1).split()
    return int(tokens[0]) + sum(int(x) * (1 if op == "+" else -1) for op, x in zip(tokens[1::2], tokens[2::2]))


def test_rl_prompts_have_checkable_gt(data_demo_dir):
    patterns = set()
    for name in ("rl_train", "rl_eval"):
        for r in _jsonl(data_demo_dir[name]):
            user, placeholder = r["conversations"]
            assert placeholder == {"role": "assistant", "content": ""}
            # The default skill is "chain": three numbers, each operator drawn at random.
            assert r["gt"] == [str(_chain_value(user["content"]))], r
            assert skill_of(user["content"]) in ("chain", "two_step")
            patterns.add(tuple(re.findall(r" ([+-]) \d", user["content"])))
    assert patterns == {("+", "+"), ("+", "-"), ("-", "+"), ("-", "-")}


def test_chain_steps_are_split_and_sft_sees_few_chains(data_demo_dir):
    for split in ("train", "eval"):
        for r in rl_prompts(100, split, skill="chain"):
            q = r["conversations"][0]["content"]
            numbers, ops = list(map(int, re.findall(r"\d+", q))), re.findall(r" ([+-]) \d", q)
            running = numbers[0]
            for op, b in zip(ops, numbers[1:]):
                key = ("add", min(running, b), max(running, b)) if op == "+" else ("sub", running, b)
                assert _shared(key) or split_of(*key) == split, q
                running = running + b if op == "+" else running - b
                assert running >= 0
    # SFT teaches the story's pattern "+ then -" and only now and then a chain (the RL prompts' edge).
    users = [next(m["content"] for m in r["conversations"] if m["role"] == "user") for r in _jsonl(data_demo_dir["sft_train"])]
    share = sum(skill_of(u) == "chain" for u in users) / len(users)
    assert 0.002 < share < 0.03, share


def test_reward_pairs_are_chains_with_the_policys_mistakes(data_demo_dir):
    records = _jsonl(data_demo_dir["reward_train"])
    kinds = {"no_answer": 0, "early": 0, "operator": 0, "other": 0}
    for r in records:
        prompt = r["chosen"][0]["content"]
        chosen, rejected = r["chosen"][-1]["content"], r["rejected"][-1]["content"]
        assert r["chosen"][:-1] == r["rejected"][:-1] and chosen != rejected
        value = _chain_value(prompt)
        assert extract_answer(chosen) == str(value) and _equations_true(chosen), chosen
        bad = extract_answer(rejected)
        if bad is None:
            kinds["no_answer"] += 1
        elif rejected.count(" so ") < chosen.count(" so "):
            kinds["early"] += 1
        elif re.findall(r"so \d+ ([+-])", rejected) != re.findall(r"so \d+ ([+-])", chosen):
            kinds["operator"] += 1
            assert _equations_true(rejected) and bad != str(value)
        else:
            kinds["other"] += 1
            assert bad != str(value)
    assert all(n > 0.05 * len(records) for n in kinds.values()), kinds
    assert reward_pairs(5, "eval") != reward_pairs(5, "train")


def test_rl_skill_chooses_what_the_prompts_ask():
    easy = rl_prompts(60, "train", skill="one_digit_word")
    for r in easy:
        q = r["conversations"][0]["content"]
        a, b = map(int, re.findall(r"\d+", q))
        value = a + b if ("more" in q or "together" in q) else a - b
        assert a < 10 and b < 10 and r["gt"] == [str(value)], q
    for skill in ("word", "two_step", "copy"):
        rows = rl_prompts(50, "train", skill=skill)
        assert all(skill_of(r["conversations"][0]["content"]) == skill for r in rows), skill
    carry = rl_prompts(60, "train", skill="word")
    for r in carry:  # two-digit, and the units column carries or borrows
        a, b = map(int, re.findall(r"\d+", r["conversations"][0]["content"]))
        assert min(a, b) >= 10 and ("carry 1" in _eq(a, "+", b) or "borrow 1" in _eq(max(a, b), "-", min(a, b)))
    with pytest.raises(ValueError, match="expected one of"):
        rl_prompts(1, "train", skill="juggling")


def test_one_digit_facts_are_shared_and_everything_else_is_split():
    assert _shared(("add", 3, 9)) and _shared(("sub", 9, 4))
    assert not _shared(("add", 3, 19)) and not _shared(("ctx", "Tom", "Mia", "eggs"))
    # Shared facts appear in both splits; the word-problem contexts around them do not.
    train, held_out = rl_prompts(300, "train", skill="one_digit_word"), rl_prompts(300, "eval", skill="one_digit_word")
    facts = [{tuple(map(int, re.findall(r"\d+", r["conversations"][0]["content"]))) for r in rows}
             for rows in (train, held_out)]
    assert len(facts[0] & facts[1]) > 20

    patterns = (r"(\w+) has \d+ (\w+)\. (?:He|She) gives \d+ \w+ to (\w+)", r"(\w+) has \d+ (\w+)\. (\w+) gives",
                r"(\w+) has \d+ (\w+) and (\w+) has", r"(\w+) had \d+ (\w+)\. (\w+) took")
    for split, rows in (("train", train), ("eval", held_out)):
        for r in rows:
            q = r["conversations"][0]["content"]
            m = next(m for p in patterns if (m := re.match(p, q)))
            name, thing, other = m.groups()
            assert split_of("ctx", name, other, thing) == split, q


def test_worked_sums_are_right_and_every_column_step_is_a_shared_fact():
    for a in range(0, 125):
        for b in range(0, 100):
            for op in "+-":
                if op == "-" and b > a:
                    continue
                text = _eq(a, op, b)
                assert _equations_true(text), text
                *steps, last = EQ.findall(text)
                assert last[:3] == (str(a), op, str(b)) and int(last[3]) == (a + b if op == "+" else a - b)
                # Only the whole sum may be a held-out pair; each column is a fact every split knows.
                steps = [(int(x), o, int(y)) for x, o, y, _ in steps]
                assert all(_shared(("add", min(x, y), max(x, y)) if o == "+" else ("sub", x, y))
                           for x, o, y in steps), text
                if a >= 10 or b >= 10:  # the units column says whether it carries or borrows
                    units = text.split(": ", 1)[1].split("; ")[0]
                    assert ("carry 1" in units) == (op == "+" and a % 10 + b % 10 >= 10), text
                    assert ("borrow 1" in units) == (op == "-" and a % 10 < b % 10), text


def test_tokenizer_corpus_is_train_only(tmp_path):
    paths = write_demo_data(tmp_path, SMALL)
    corpus = list(tokenizer_corpus(tmp_path, SMALL))
    eval_prompts = _user_texts(_jsonl(paths["sft_eval"]))
    assert len(corpus) > SMALL.pretrain_train + 2 * SMALL.sft_train
    assert not eval_prompts & set(corpus)
    assert _jsonl(paths["pretrain_train"])[0]["text"] == corpus[0]


@pytest.mark.parametrize("question, skill", [
    ("Ben has a yellow cup and Amy has a pink pen. Who has the yellow cup?", "copy"),
    ("Tom went to the park and Mia went to the zoo. Where did Mia go?", "copy"),
    ("What is 3 + 4?", "one_digit_arith"),
    ("Compute 33 + 11.", "arith"),
    ("Tom has 3 eggs. Mia gives him 4 more. How many eggs does Tom have now?", "one_digit_word"),
    ("Tom has 23 eggs. Mia gives him 45 more. How many eggs does Tom have now?", "word"),
    ("What is 23 + 45 - 17?", "two_step"),
    ("What is 23 - 17 + 45?", "chain"),
    ("Compute 23 + 45 + 17.", "chain"),
    ("Now add 12 to that.", "follow_up"),
    ("Tell me a joke.", "other"),
])
def test_skill_of_reads_the_skill_from_the_question(question, skill):
    assert skill_of(question) == skill


def test_every_demo_question_has_a_skill(data_demo_dir):
    """A new question template must be given a skill, or the per-skill report silently lumps it in 'other'."""
    seen = set()
    for name in ("sft_train", "sft_eval"):
        for line in data_demo_dir[name].read_text().splitlines():
            users = [m["content"] for m in json.loads(line)["conversations"] if m["role"] == "user"]
            seen.add(skill_of(users[-1]))
    assert "other" not in seen
    assert seen == set(SKILLS)


def test_pictures_told_in_words_keep_their_split_and_reach_the_tokenizer(tmp_path):
    """Pretraining tells a few pictures of the VLM world in words (train scenes in train, eval scenes in
    eval), and the tokenizer reads the train picture records: "circle" is a token, not six letters."""
    import pyarrow.parquet as pq

    from dataset.demo import pretrain_texts
    from dataset.demo_vision import CELLS, SHAPES, VISION_COLOURS, scene_split

    thing = re.compile(rf"an? ({'|'.join(VISION_COLOURS)}) ({'|'.join(SHAPES)}) at the ({'|'.join(CELLS)})")
    for split in ("train", "eval"):
        told = [m.group(1) for d in pretrain_texts(300, split) for m in re.finditer(r"The picture shows ([^.]*)\.", d)]
        assert len(told) >= 10
        for sentence in told:
            objects = [(cell, shape, colour) for colour, shape, cell in thing.findall(sentence)]
            assert objects and scene_split(objects) == split, sentence
    corpus = set(tokenizer_corpus(tmp_path, SMALL))
    captions = {json.loads(c)[1]["content"]
                for name in ("vlm_caption_train", "vlm_caption_eval")
                for c in pq.read_table(tmp_path / f"{name}.parquet")["conversations"].to_pylist()}
    train_captions = {json.loads(c)[1]["content"]
                      for c in pq.read_table(tmp_path / "vlm_caption_train.parquet")["conversations"].to_pylist()}
    assert train_captions <= corpus and not (captions - train_captions) & corpus
    assert {"Describe the picture.", "What shape is at the top left?", "yes"} <= corpus
