"""The embedded demo world: one small, generated universe that every training stage talks about.

A model of a few M parameters sees only ~1-3M tokens in a few minutes on a laptop CPU. Open-domain
text is far too varied to learn at that budget, so the course generates its own data from a tiny
world: eight children (Tom, Mia, Sam, Lily, Ben, Zoe, Max, Amy), ten objects, eight colours, six
places, countable things, and small-number arithmetic. The vocabulary is a few hundred words, so
each stage can show its effect in minutes:

* pretraining text (``{"text"}``): little stories ("Mia has a red ball. She went to the park."),
  one-digit facts ("7 + 5 = 12."), two-digit sums worked in columns ("47 + 25: 7 + 5 = 12, carry 1;
  4 + 2 + 1 = 7; so 47 + 25 = 72.", see :func:`_eq`) and word problems with their worked answer
  ("Tom has 47 apples. Mia gives him 25 more. 47 + 25: ... Now Tom has 72 apples.");
* SFT chats (``{"conversations"}``): arithmetic, word problems and questions answerable from the
  prompt; every assistant turn ends with the checkable line "The answer is X." (:func:`extract_answer`);
* DPO pairs (``{"chosen", "rejected"}``): same prompt; the rejected answer holds a plausible mistake
  (off by one or ten, wrong operation, wrong colour/person/place) or drops the "The answer is" line,
  so the preference is decidable from the text alone;
* RL prompts (``{"conversations": [user, placeholder], "gt": ["81"]}``): questions of one skill
  (``DemoSizes.rl_skill``) that the SFT model gets right only part of the time, which is where
  GRPO/PPO have something to learn: a group of sampled answers must hold both right and wrong ones.
  The default is ``chain``: three numbers joined by operators drawn at random ("What is 33 - 30 +
  19?"). SFT teaches two-step sums almost always in the story's pattern "a + b - c" and only now
  and then a chain (:data:`CHAIN_SHARE`), so the SFT model knows how to read the operators but
  often writes the pattern instead (~50% right): RL has to teach it to read the question.
  ``copy`` (a name, colour or place from the story), ``word``, ``two_step`` and ``one_digit_word``
  are the other skills;
* reward-model pairs (``reward_{train,eval}.jsonl``, DPO's format): chain questions with a right
  answer and one with the mistakes the SFT model makes there (:func:`reward_pairs`): the reward
  model judges the answers PPO will sample, as InstructGPT's labellers compared the policy's own
  answers to the prompt distribution.

Held-out splits measure generalisation, not recall. Every two-digit arithmetic step ``(op, a, b)``
(addition keyed by the unordered pair), every world fact ``(name, colour, object)`` /
``(name, place)`` and every word-problem cast ``(name, other, thing)`` is assigned to train or eval
by a hash (:func:`split_of`); a train item only ever uses train keys and an eval item only eval
keys, in every stage. The 81 one-digit facts ("7 + 5 = 12") are the exception (:func:`_shared`):
they are this world's times table, known to both splits, and a held-out question uses them in a
cast no train record has. Train and eval also use different random seeds.

Generation is deterministic (``random.Random`` seeded with a string), takes a couple of seconds and
copies no third-party text. The pictures of the same world (the VLM stage) are in
:mod:`dataset.demo_vision`.
"""

from __future__ import annotations

import json
import math
import random
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

DEMO_VERSION = 6
EVAL_PERCENT = 15
# Of SFT's (and DPO's) bare two-step questions, the share that are chains with random operators
# (~2% of all SFT chats). Measured on held-out chains after SFT: at 0 the model writes the story's
# pattern every time (35% right; a sampled "a + b + c" is never right, so GRPO has no signal there);
# at 0.1 it reads them now and then, and how often depends on the seed ("a + b + c" right in 0-15%
# of samples; GRPO gained 12 points in one seed, 32 in another); at 0.3 it reads them (75%), and
# RL has little left to do.
CHAIN_SHARE = 0.2
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a careful math tutor. End with the answer.",
    "Answer the question about the story.",
)

NAMES = ("Tom", "Mia", "Sam", "Lily", "Ben", "Zoe", "Max", "Amy")
GIRLS = frozenset({"Mia", "Lily", "Zoe", "Amy"})
OBJECTS = ("ball", "cup", "hat", "book", "box", "kite", "car", "bag", "pen", "boat")
COLOURS = ("red", "blue", "green", "yellow", "pink", "black", "white", "orange")
PLACES = ("the park", "the shop", "the beach", "the school", "the farm", "the zoo")
THINGS = ("apples", "pears", "eggs", "coins", "stickers", "shells")


@dataclass(frozen=True)
class DemoSizes:
    """Record counts per file, tuned for a few-M-parameter model on 2 CPU cores.

    With ~1 token per word, digit or punctuation mark the defaults give roughly 600k pretraining
    tokens, 8k SFT chats (~650k tokens with the chat template), 3k DPO pairs, 3k reward-model pairs
    and 2k RL prompts; eval files are small.
    ``rl_skill``: what the RL prompts ask, one of :data:`RL_SKILLS` (see :func:`rl_prompts`).
    """

    pretrain_train: int = 6000
    pretrain_eval: int = 400
    sft_train: int = 8000
    sft_eval: int = 400
    dpo_train: int = 3000
    dpo_eval: int = 300
    reward_train: int = 3000
    reward_eval: int = 300
    rl_train: int = 2000
    rl_eval: int = 300
    rl_skill: str = "chain"
    seed: int = 0


def split_of(*key: object) -> str:
    """``"eval"`` for about :data:`EVAL_PERCENT` % of keys, else ``"train"``; stable across runs."""
    digest = zlib.crc32("|".join(map(str, key)).encode())
    return "eval" if digest % 100 < EVAL_PERCENT else "train"


def _shared(key: tuple) -> bool:
    """One-digit number facts ("7 + 5", "9 - 4") belong to every split. They are the times table of
    this world: there are only 81 of them and no rule predicts an unseen one, so holding some out
    would only make held-out questions unanswerable. Held-out arithmetic is about *combining* them:
    new two-digit pairs, and one-digit facts in new contexts (who, what)."""
    if key[0] not in ("add", "sub") or len(key) != 3 or not all(isinstance(x, int) for x in key[1:]):
        return False
    a, b = key[1:]
    # A borrowing column ("12 - 7 = 5") is a one-digit fact read backwards: shared like "5 + 7 = 12".
    return a < 10 and b < 10 or key[0] == "sub" and a < 19 and b < 10 and a - b < 10


def _add_key(a: int, b: int) -> tuple:
    return ("add", min(a, b), max(a, b))


def _sub_key(a: int, b: int) -> tuple:
    return ("sub", a, b)


def extract_answer(text: str) -> str | None:
    """The ``X`` of the last "The answer is X" in ``text`` (case-insensitive), without a final '.'.

    ``"23 + 45 = 68. The answer is 68."`` -> ``"68"``; no such line -> ``None``.
    """
    starts = [m.end() for m in re.finditer(r"the answer is\b", text, flags=re.IGNORECASE)]
    if not starts:
        return None
    rest = text[starts[-1]:].split("\n", 1)[0]
    answer = re.split(r"\.\s", rest, maxsplit=1)[0].strip().rstrip(".").strip()
    return answer or None


SKILLS = ("copy", "one_digit_arith", "arith", "one_digit_word", "word", "two_step", "chain", "follow_up")


def skill_of(question: str) -> str:
    """The skill a demo question asks for, read from its text (for a per-skill accuracy breakdown).

    ``copy``: the answer is a name, colour or place stated in the question; ``one_digit_arith`` /
    ``arith``: bare arithmetic with one-digit / larger numbers; ``one_digit_word`` / ``word``: a
    one-step word problem; ``two_step``: two operations in a row; ``follow_up``: a second turn that
    builds on the previous answer; ``chain``: three numbers whose operators are not the story's
    pattern "+ then -" (read from the question, see :func:`_q_chain`). Any other text (not a demo
    question) is ``other``.
    """
    numbers = [int(n) for n in re.findall(r"\d+", question)]
    if re.search(r"^(Now add|Now take away|And what colour)", question):
        return "follow_up"
    if re.search(r"What colour is|Who has the|Where did", question):
        return "copy"
    if len(numbers) == 3:
        return "two_step" if re.findall(r" ([+-]) \d", question) in ([], ["+", "-"]) else "chain"
    if len(numbers) != 2:
        return "other"
    small = all(n < 10 for n in numbers)
    if re.search(r"How many", question):
        return "one_digit_word" if small else "word"
    return "one_digit_arith" if small else "arith"


def word_tokens(text: str) -> list[str]:
    """A crude tokenizer: words, single digits and punctuation marks (a stand-in for BPE counts)."""
    return re.findall(r"[A-Za-z']+|\d|[^\sA-Za-z\d]", text)


def unigram_entropy(texts: Iterable[str], tokenize: Callable[[str], Sequence] | None = None) -> float:
    """Entropy in nats per token of the unigram distribution of ``texts`` (plug-in estimate).

    A baseline for the pretraining loss (also in nats per token): a model that ignores context
    can do no better. Pass ``tokenize`` (text -> token ids) to count the model's own tokens;
    the default is :func:`word_tokens`.
    """
    tokenize = tokenize or word_tokens
    counts: Counter = Counter()
    for text in texts:
        counts.update(tokenize(text))
    total = sum(counts.values())
    if total == 0:
        raise ValueError("no tokens")
    return -sum(c / total * math.log(c / total) for c in counts.values())


def _he(name: str) -> str:
    return "she" if name in GIRLS else "he"


def _him(name: str) -> str:
    return "her" if name in GIRLS else "him"


def _his(name: str) -> str:
    return "her" if name in GIRLS else "his"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass
class _World:
    """Samplers for one split (``"train"`` or ``"eval"``) driven by one seeded ``random.Random``.

    Every sampler rejects draws whose keys fall in the other split.
    """

    rng: random.Random
    split: str

    def ok(self, *keys: tuple) -> bool:
        return all(_shared(k) or split_of(*k) == self.split for k in keys)

    def add_pair(self, lo: int = 10, hi: int = 99, carry: bool | None = None) -> tuple[int, int]:
        while True:
            a, b = self.rng.randint(lo, hi), self.rng.randint(lo, hi)
            if carry is not None and ((a % 10 + b % 10) >= 10) != carry:
                continue
            if self.ok(_add_key(a, b)):
                return a, b

    def sub_pair(self, lo: int = 10, hi: int = 99, borrow: bool | None = None) -> tuple[int, int]:
        while True:
            a, b = self.rng.randint(lo, hi), self.rng.randint(lo, hi)
            if b > a:
                a, b = b, a
            if borrow is not None and (a % 10 < b % 10) != borrow:
                continue
            if self.ok(_sub_key(a, b)):
                return a, b

    def two_step(self, lo: int = 10, hi: int = 60) -> tuple[int, int, int]:
        """``a + b - c`` with every step in this split and a non-negative result."""
        while True:
            a, b = self.rng.randint(lo, hi), self.rng.randint(lo, hi)
            c = self.rng.randint(lo, a + b)
            if self.ok(_add_key(a, b), _sub_key(a + b, c)):
                return a, b, c

    def small_pair(self, op: str, lo: int = 1) -> tuple[int, int]:
        if op == "+":
            return self.add_pair(lo, 9)
        return self.sub_pair(lo, 9)

    def fact(self) -> tuple[str, str, str]:
        while True:
            name = self.rng.choice(NAMES)
            colour, obj = self.rng.choice(COLOURS), self.rng.choice(OBJECTS)
            if self.ok(("has", name, colour, obj)):
                return name, colour, obj

    def facts(self, n: int) -> list[tuple[str, str, str]]:
        """``n`` facts about ``n`` different people with different objects and colours."""
        while True:
            picked = [self.fact() for _ in range(n)]
            if all(len({f[i] for f in picked}) == n for i in range(3)):
                return picked

    def trip(self) -> tuple[str, str]:
        while True:
            name, place = self.rng.choice(NAMES), self.rng.choice(PLACES)
            if self.ok(("went", name, place)):
                return name, place

    def trips(self, n: int) -> list[tuple[str, str]]:
        while True:
            picked = [self.trip() for _ in range(n)]
            if len({t[0] for t in picked}) == n and len({t[1] for t in picked}) == n:
                return picked

    def other_name(self, *exclude: str) -> str:
        return self.rng.choice([n for n in NAMES if n not in exclude])

    def context(self) -> tuple[str, str, str]:
        """(name, other, thing) of a word problem; held out by split, so an eval word problem over a
        shared one-digit fact is still a question no train record asks."""
        while True:
            name = self.rng.choice(NAMES)
            other, thing = self.other_name(name), self.rng.choice(THINGS)
            if self.ok(("ctx", name, other, thing)):
                return name, other, thing


def _eq(a: int, op: str, b: int) -> str:
    """``a op b`` worked in columns, the way a child is taught, so every step is a one-digit fact.

    With one digit per token, "47 + 25 = 72" written at once asks a tiny model to know the carry
    before it writes the tens digit: it must do the whole sum inside one forward pass, and it can
    only memorise pairs it has seen (held-out pairs stay near chance). Worked in columns, each
    token needs one fact this world shares across splits (``7 + 5 = 12``, ``12 - 7 = 5``):

    ``47 + 25: 7 + 5 = 12, carry 1; 4 + 2 + 1 = 7; so 47 + 25 = 72.``
    ``52 - 17: 12 - 7 = 5, borrow 1; 5 - 1 - 1 = 3; so 52 - 17 = 35.``
    ``7 + 5 = 12.`` (two one-digit numbers: a fact, nothing to work)
    """
    c = a + b if op == "+" else a - b
    if a < 10 and b < 10:
        return f"{a} {op} {b} = {c}."
    steps, extra = [], 0  # extra: the carry (+) or borrow (-) coming into this column
    n_columns = len(str(max(a, b)))
    for i in range(n_columns):
        x, y = a // 10**i % 10, b // 10**i % 10
        last = i == n_columns - 1
        if op == "+":
            total = x + y + extra
            step = f"{x} + {y}" + (" + 1" if extra else "") + f" = {total}"
            extra = int(total >= 10 and not last)
        else:
            borrow = x - y - extra < 0
            step = f"{x + 10 * borrow} - {y}" + (" - 1" if extra else "") + f" = {x + 10 * borrow - y - extra}"
            extra = int(borrow)
        steps.append(step + (", carry 1" if op == "+" and extra else ", borrow 1" if extra else ""))
    return f"{a} {op} {b}: {'; '.join(steps)}; so {a} {op} {b} = {c}."


def _story(w: _World) -> str:
    """A few sentences about who has what and who went where."""
    rng = w.rng
    (n1, c1, o1), (n2, c2, o2) = w.facts(2)
    t1, t2 = w.trips(2)
    sentences = [f"{n1} has {_a(c1)} {c1} {o1}.", f"{n2} has {_a(c2)} {c2} {o2}."]
    rng.shuffle(sentences)
    extra = [
        f"{t1[0]} went to {t1[1]}.",
        f"{t2[0]} went to {t2[1]}.",
        f"{n1} likes {_his(n1)} {c1} {o1}.",
        f"The {o2} of {n2} is {c2}.",
        f"{n1} played with the {c1} {o1} all day.",
        f"{n2} and {w.other_name(n2)} went to {t1[1]} together.",
        f"At {t2[1]}, {t2[0]} saw {_a(c1)} {c1} {o1}.",
        f"{n1}'s {o1} is {c1}.",
    ]
    sentences += rng.sample(extra, rng.randint(2, 5))
    return " ".join(sentences)


def _facts_doc(w: _World) -> str:
    rng = w.rng
    lines = []
    for _ in range(rng.randint(2, 5)):
        op = rng.choice("+-")
        if rng.random() < 0.25:
            a, b = w.small_pair(op)
        else:
            a, b = w.add_pair() if op == "+" else w.sub_pair()
        lines.append(_eq(a, op, b))
    return " ".join(lines)


def _word_problem_story(w: _World) -> str:
    rng = w.rng
    name, other, thing = w.context()
    kind, small = rng.random(), rng.random() < 0.3
    if kind < 0.45:
        a, b = w.small_pair("+", lo=2) if small else w.add_pair()
        return (f"{name} has {a} {thing}. {other} gives {_him(name)} {b} more. "
                f"{_eq(a, '+', b)} Now {name} has {a + b} {thing}.")
    if kind < 0.9:
        a, b = w.small_pair("-", lo=2) if small else w.sub_pair()
        return (f"{name} has {a} {thing}. {_cap(_he(name))} gives {b} {thing} to {other}. "
                f"{_eq(a, '-', b)} Now {name} has {a - b} {thing}.")
    a, b, c = w.two_step()
    return (f"{name} has {a} {thing}. {other} gives {_him(name)} {b} more. Then {_he(name)} "
            f"gives {c} to {w.other_name(name, other)}. {_eq(a, '+', b)} {_eq(a + b, '-', c)} "
            f"Now {name} has {a + b - c} {thing}.")


def _qa_doc(w: _World) -> str:
    (n1, c1, o1), (n2, c2, o2) = w.facts(2)
    return (f"{n1} has {_a(c1)} {c1} {o1} and {n2} has {_a(c2)} {c2} {o2}. "
            f"What colour is {n1}'s {o1}? It is {c1}. Who has the {c2} {o2}? {n2} has it.")


def _solved_question_doc(w: _World) -> str:
    """A question followed by its worked answer, as plain text. A few-M-parameter model learns to
    copy names and numbers from a question into its answer far more slowly than it learns the
    language; seeing the pattern during pretraining leaves SFT only the chat format to teach."""
    roll = w.rng.random()
    if roll < 0.35:
        q, a, _ = _q_arith(w)
    elif roll < 0.7:
        q, a, _ = _q_word(w, small=w.rng.random() < 0.3)
    else:
        q, a, *_ = _q_world(w)
    return f"{q} {a}"


def _picture_doc(w: _World) -> str:
    """A picture of the VLM stage's world told in words ("The picture shows a red circle at the top
    left and a blue square at the bottom right."), a scene of this split: the language model knows
    the words of shapes, colours and places before it ever sees a picture, as a real LM knows English
    before it is given eyes."""
    from dataset.demo_vision import caption, random_scene  # late: demo_vision imports this module

    text = caption(random_scene(w.rng, w.split))
    return f"The picture shows {text[0].lower()}{text[1:]}"


def pretrain_texts(n: int, split: str, seed: int = 0) -> list[str]:
    """``n`` pretraining documents: stories, arithmetic facts, word problems, short Q&A, questions
    with their worked answers, and a few pictures described in words."""
    w = _World(random.Random(f"demo-pretrain-{split}-{seed}"), split)
    makers = (_story, _facts_doc, _word_problem_story, _qa_doc, _solved_question_doc, _picture_doc)
    weights = (0.25, 0.2, 0.2, 0.1, 0.25, 0.05)
    docs = []
    for _ in range(n):
        parts = [w.rng.choices(makers, weights)[0](w) for _ in range(w.rng.randint(1, 3))]
        docs.append(" ".join(parts))
    return docs


def _q_arith(w: _World, op: str | None = None, carry: bool | None = None) -> tuple[str, str, int]:
    """A bare arithmetic question -> (question, worked answer, value)."""
    rng = w.rng
    op = op or rng.choice("+-")
    # A bare one-digit question has no context to hold out (its fact is shared), so only train asks it.
    small = carry is None and w.split == "train" and rng.random() < 0.1
    if op == "+":
        a, b = w.small_pair("+") if small else w.add_pair(carry=carry)
        q = rng.choice([f"What is {a} + {b}?", f"Compute {a} + {b}.", f"Add {a} and {b}.",
                        f"How much is {a} + {b}?"])
        c = a + b
    else:
        a, b = w.small_pair("-") if small else w.sub_pair(borrow=carry)
        q = rng.choice([f"What is {a} - {b}?", f"Compute {a} - {b}.", f"Subtract {b} from {a}.",
                        f"How much is {a} - {b}?"])
        c = a - b
    return q, f"{_eq(a, op, b)} The answer is {c}.", c


def _work_chain(numbers: Sequence[int], ops: Sequence[str]) -> tuple[list[str], list[tuple], int] | None:
    """``numbers[0] ops[0] numbers[1] ...`` worked one step at a time -> (worked steps, their keys,
    value), or ``None`` when a running value would go below 0."""
    value, steps, keys = numbers[0], [], []
    for op, b in zip(ops, numbers[1:]):
        if op == "-" and b > value:
            return None
        keys.append(_add_key(value, b) if op == "+" else _sub_key(value, b))
        steps.append(_eq(value, op, b))
        value = value + b if op == "+" else value - b
    return steps, keys, value


def _chain(w: _World, n_numbers: int = 3) -> tuple[list[int], list[str], list[str], int]:
    """(numbers, operators, worked steps, value) of a chain whose every step is a key of this split."""
    rng = w.rng
    while True:
        numbers = [rng.randint(10, 60) for _ in range(n_numbers)]
        ops = [rng.choice("+-") for _ in range(n_numbers - 1)]
        worked = _work_chain(numbers, ops)
        if worked and w.ok(*worked[1]):
            return numbers, ops, worked[0], worked[2]


def _q_chain(w: _World, n_numbers: int = 3) -> tuple[str, str, int]:
    """``a op b op c`` with every operator drawn at random -> (question, worked answer, value).

    SFT mostly sees the two-step pattern ``a + b - c``; a chain must read its operators from the
    question, one step at a time, so a model that learnt the pattern instead of reading the question
    answers "33 - 30 + 19" as "33 + 30 ... - 19". Every running value stays >= 0."""
    numbers, ops, steps, value = _chain(w, n_numbers)
    expr = " ".join([str(numbers[0])] + [f"{op} {b}" for op, b in zip(ops, numbers[1:])])
    q = w.rng.choice([f"What is {expr}?", f"Compute {expr}."])
    return q, f"{' '.join(steps)} The answer is {value}.", value


def _q_steps(w: _World) -> tuple[str, str, int]:
    """A bare question of two steps: mostly the story's pattern "a + b - c" (a child has some, gets
    more, gives some away); now and then (:data:`CHAIN_SHARE`) a chain whose operators must be read,
    so a model taught on these knows how to read them, but not reliably: the RL prompts' edge."""
    return _q_chain(w) if w.rng.random() < CHAIN_SHARE else _q_two_step(w)


def _q_two_step(w: _World) -> tuple[str, str, int]:
    a, b, c = w.two_step()
    q = w.rng.choice([f"What is {a} + {b} - {c}?", f"Compute {a} + {b} - {c}."])
    r = a + b - c
    return q, f"{_eq(a, '+', b)} {_eq(a + b, '-', c)} The answer is {r}.", r


def _q_word(w: _World, carry: bool | None = None, steps: int = 1, small: bool = False) -> tuple[str, str, int]:
    """A word problem -> (question, worked answer, value); ``small``: one-digit numbers."""
    rng = w.rng
    name, other, thing = w.context()
    if steps == 2:
        a, b, c = w.two_step()
        third = w.other_name(name, other)
        q = (f"{name} has {a} {thing}. {other} gives {_him(name)} {b} more. Then {_he(name)} gives "
             f"{c} {thing} to {third}. How many {thing} does {name} have now?")
        r = a + b - c
        return q, f"{_eq(a, '+', b)} {_eq(a + b, '-', c)} The answer is {r}.", r
    if rng.random() < 0.5:
        a, b = w.small_pair("+", lo=2) if small else w.add_pair(carry=carry)
        q = rng.choice([
            f"{name} has {a} {thing}. {other} gives {_him(name)} {b} more. How many {thing} does {name} have now?",
            f"{name} has {a} {thing} and {other} has {b} {thing}. How many {thing} do they have together?",
        ])
        return q, f"{_eq(a, '+', b)} The answer is {a + b}.", a + b
    a, b = w.small_pair("-", lo=2) if small else w.sub_pair(borrow=carry)
    q = rng.choice([
        f"{name} has {a} {thing}. {_cap(_he(name))} gives {b} {thing} to {other}. "
        f"How many {thing} does {name} have left?",
        f"{name} had {a} {thing}. {other} took {b} of them. How many {thing} does {name} have now?",
    ])
    return q, f"{_eq(a, '-', b)} The answer is {a - b}.", a - b


def _q_world(w: _World) -> tuple[str, str, str, list]:
    """A question answerable from the prompt -> (question, answer text, answer, facts used)."""
    rng = w.rng
    if rng.random() < 0.25:
        trips = w.trips(2)
        context = " and ".join(f"{n} went to {p}" for n, p in trips) + "."
        name, place = rng.choice(trips)
        q = f"{context} Where did {name} go?"
        return q, f"{name} went to {place}. The answer is {place}.", place, trips
    facts = w.facts(rng.choice((2, 2, 3)))
    context = _cap(" and ".join(f"{n} has {_a(c)} {c} {o}" for n, c, o in facts)) + "."
    name, colour, obj = rng.choice(facts)
    if rng.random() < 0.6:
        q = f"{context} What colour is {name}'s {obj}?"
        return q, f"{name}'s {obj} is {colour}. The answer is {colour}.", colour, facts
    q = f"{context} Who has the {colour} {obj}?"
    return q, f"{name} has the {colour} {obj}. The answer is {name}.", name, facts


def recall_questions(n: int, split: str, seed: int = 0) -> list[tuple[str, str, str]]:
    """``n`` questions of the "copy" skill (the answer is a colour, name or place stated in the
    question) as ``(question, worked answer, answer)``, e.g. ("Ben has a yellow cup and Amy has a pink
    pen. What colour is Ben's cup?", "Ben's cup is yellow. The answer is yellow.", "yellow")."""
    w = _World(random.Random(f"demo-recall-{split}-{seed}"), split)
    return [tuple(_q_world(w)[:3]) for _ in range(n)]


def recall_drills(n: int, split: str, seed: int = 0) -> list[str]:
    """``n`` texts that state 2-3 facts and then ask about every fact both ways, answered ("What
    colour is Ben's cup? Ben's cup is yellow. Who has the pink pen? Amy has the pink pen. ..."):
    the densest lookup signal this world can give a language model."""
    w = _World(random.Random(f"demo-drill-{split}-{seed}"), split)
    texts = []
    for _ in range(n):
        facts = w.facts(w.rng.choice((2, 3)))
        lines = []
        for name, colour, obj in facts:
            lines += [f"What colour is {name}'s {obj}? {name}'s {obj} is {colour}.",
                      f"Who has the {colour} {obj}? {name} has the {colour} {obj}."]
        w.rng.shuffle(lines)
        story = _cap(" and ".join(f"{n_} has {_a(c)} {c} {o}" for n_, c, o in facts)) + "."
        texts.append(" ".join([story, *lines]))
    return texts


def _follow_up(w: _World, value: int) -> tuple[str, str] | None:
    """A second turn that builds on the first answer ("Now add 12 to that.")."""
    for _ in range(50):
        b = w.rng.randint(2, 30)
        if w.rng.random() < 0.5 and w.ok(_add_key(value, b)):
            return f"Now add {b} to that.", f"{_eq(value, '+', b)} The answer is {value + b}."
        if value >= b and w.ok(_sub_key(value, b)):
            return f"Now take away {b}.", f"{_eq(value, '-', b)} The answer is {value - b}."
    return None


def _sft_one(w: _World) -> list[dict]:
    rng = w.rng
    roll = rng.random()
    follow = None
    if roll < 0.35:
        q, a, value = _q_arith(w)
        follow = _follow_up(w, value) if rng.random() < 0.25 else None
    elif roll < 0.45:
        q, a, value = _q_steps(w)
    elif roll < 0.7:
        steps = 2 if rng.random() < 0.2 else 1
        q, a, value = _q_word(w, steps=steps, small=steps == 1 and rng.random() < 0.3)
    else:
        q, a, answer, facts = _q_world(w)
        if rng.random() < 0.25 and len(facts[0]) == 3:
            name, colour, obj = next(f for f in facts if answer not in f)
            follow = (f"And what colour is {name}'s {obj}?", f"{name}'s {obj} is {colour}. The answer is {colour}.")
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if follow:
        messages += [{"role": "user", "content": follow[0]}, {"role": "assistant", "content": follow[1]}]
    if rng.random() < 0.08:
        messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    return messages


def sft_conversations(n: int, split: str, seed: int = 0) -> list[dict]:
    """``n`` MiniMind SFT records ``{"conversations": [...]}``; every assistant turn ends with
    "The answer is X."; ~15% are two-turn, ~8% start with a system message."""
    w = _World(random.Random(f"demo-sft-{split}-{seed}"), split)
    return [{"conversations": _sft_one(w)} for _ in range(n)]


def _wrong_number(w: _World, answer: str, value: int) -> str:
    """The worked answer with a plausible arithmetic slip: off by one or by ten in the result."""
    wrong = _off_by_one_or_ten(w, value)
    head, _, _ = answer.rpartition("The answer is")
    head = re.sub(rf"= {value}\.(?!.*= )", f"= {wrong}.", head.strip())
    return f"{head} The answer is {wrong}."


def _wrong_answer_line(w: _World, answer: str, value: int) -> str:
    """The worked answer right to its last step, then a slip in writing the answer down: the answer
    line off by one or by ten ("... so 47 + 25 = 72. The answer is 73.").

    DPO's pairs use this, not :func:`_wrong_number`: when the last equation *and* the answer line are
    off, the pair differs in two places and only redoing the last column tells them apart; a model
    that cannot yet do that check learns the cheaper lesson "do not copy the result into the answer
    line", and held-out answers came out with a right result and a wrong answer line (DPO at lr 4e-5
    took the RL prompts from 44% to 38%). A slip in the answer line alone teaches "the answer line
    copies the result", which helps."""
    return f"{_without_answer_line(answer)} The answer is {_off_by_one_or_ten(w, value)}."


def _off_by_one_or_ten(w: _World, value: int) -> int:
    """``value`` +- 1 or +- 10, never negative: the size of a slip in one digit."""
    delta = w.rng.choice([1, -1, 10, -10])
    return value - delta if value + delta < 0 else value + delta


def _without_answer_line(answer: str) -> str:
    """The worked steps of an answer, its final "The answer is X." cut off."""
    return answer.rpartition(" The answer is")[0]


def _forgot_carry(a: int, op: str, b: int) -> tuple[str, int] | None:
    """The classic column slip for a two-digit ``a op b`` whose units carry or borrow, as
    (worked text, wrong value): the carry is dropped ("47 + 25: 7 + 5 = 12; 4 + 2 = 6; so 47 + 25 =
    62.") or the smaller units digit is taken from the larger ("52 - 17: 7 - 2 = 5; 5 - 1 = 4; so
    52 - 17 = 45."). Each step looks like a fact; only the method is wrong. ``None`` when the units
    column neither carries nor borrows."""
    if not (10 <= a < 100 and b < 100):
        return None
    (ta, ua), (tb, ub) = divmod(a, 10), divmod(b, 10)
    if op == "+" and ua + ub >= 10:
        units, tens, wrong = f"{ua} + {ub} = {ua + ub}", f"{ta} + {tb} = {ta + tb}", 10 * (ta + tb) + (ua + ub) % 10
    elif op == "-" and ua < ub:
        units, tens, wrong = f"{ub} - {ua} = {ub - ua}", f"{ta} - {tb} = {ta - tb}", 10 * (ta - tb) + ub - ua
    else:
        return None
    return f"{a} {op} {b}: {units}; {tens}; so {a} {op} {b} = {wrong}.", wrong


def _dpo_one(w: _World) -> dict:
    rng = w.rng
    roll = rng.random()
    if roll < 0.6:
        if rng.random() < 0.5:
            q, good, value = _q_arith(w)
        else:
            q, good, value = _q_word(w, small=rng.random() < 0.3)
        mode = rng.random()
        a_b = re.match(r"(\d+) ([+-]) (\d+)[:=]", good)
        a, op, b = (int(a_b.group(1)), a_b.group(2), int(a_b.group(3))) if a_b else (0, "", 0)
        if mode < 0.2 and a_b and (op == "-" or a >= b):
            wrong_op = "-" if op == "+" else "+"
            r = a - b if wrong_op == "-" else a + b
            bad = f"{_eq(a, wrong_op, b)} The answer is {r}."
        elif mode < 0.5 and a_b and (slip := _forgot_carry(a, op, b)):
            bad = f"{_without_answer_line(good.replace(_eq(a, op, b), slip[0]))} The answer is {slip[1]}."
        elif mode < 0.8:
            bad = _wrong_answer_line(w, good, value)
        else:
            bad = _without_answer_line(good)
    elif roll < 0.75:
        q, good, value = _q_steps(w)
        bad = _wrong_answer_line(w, good, value) if rng.random() < 0.8 else _without_answer_line(good)
    else:
        q, good, answer, facts = _q_world(w)
        if rng.random() < 0.8:
            i = next(i for i, f in enumerate(facts) if answer in f)
            wrong = facts[(i + 1) % len(facts)][facts[i].index(answer)]
            bad = good.replace(answer, wrong)
        else:
            bad = _without_answer_line(good)
    prompt = [{"role": "user", "content": q}]
    return {
        "chosen": prompt + [{"role": "assistant", "content": good}],
        "rejected": prompt + [{"role": "assistant", "content": bad}],
    }


def dpo_pairs(n: int, split: str, seed: int = 0) -> list[dict]:
    """``n`` MiniMind DPO records; ``chosen`` is correct and formatted, ``rejected`` is not."""
    w = _World(random.Random(f"demo-dpo-{split}-{seed}"), split)
    return [_dpo_one(w) for _ in range(n)]


REWARD_MISTAKES = ("operator", "carry", "off", "early", "no_answer")
# In the proportions the SFT model errs on chains (of its wrong answers at temperature 0.7: 77% an
# operator not read from the question, 20% a slip inside a column, 3% a result off by one or ten),
# plus answers cut short or without an answer line, the shortcuts a policy tries during RL.
REWARD_MISTAKE_WEIGHTS = (0.6, 0.2, 0.05, 0.1, 0.05)


def _reward_one(w: _World) -> dict:
    """A chain question (the RL prompts' skill) with a right answer and one with a mistake the SFT
    model makes on it: an operator not read from the question (the pattern ``+`` then ``-``, or one
    flipped), a carry or borrow dropped in one step, a result off by one or ten, stopping after the
    first step, or no answer line."""
    rng = w.rng
    numbers, ops, steps, value = _chain(w)
    expr = " ".join([str(numbers[0])] + [f"{op} {b}" for op, b in zip(ops, numbers[1:])])
    q = rng.choice([f"What is {expr}?", f"Compute {expr}."])
    good = f"{' '.join(steps)} The answer is {value}."
    bad = None
    while bad is None:
        mistake = rng.choices(REWARD_MISTAKES, REWARD_MISTAKE_WEIGHTS)[0]
        if mistake == "operator":
            wrong_ops = ["+", "-"] if ops != ["+", "-"] else [rng.choice("+-"), "+"]
            worked = _work_chain(numbers, wrong_ops)
            if worked and worked[2] != value:
                bad = f"{' '.join(worked[0])} The answer is {worked[2]}."
        elif mistake == "carry":
            i = rng.randrange(len(ops))
            running = _work_chain(numbers[: i + 1], ops[:i])[2]
            slip = _forgot_carry(running, ops[i], numbers[i + 1])
            if slip:
                rest = _work_chain([slip[1], *numbers[i + 2:]], ops[i + 1:])
                if rest:
                    bad = " ".join([*steps[:i], slip[0], *rest[0]]) + f" The answer is {rest[2]}."
        elif mistake == "off":
            bad = _wrong_number(w, good, value)
        elif mistake == "early":
            first = _work_chain(numbers[:2], ops[:1])
            bad = f"{first[0][0]} The answer is {first[2]}."
        else:
            bad = " ".join(steps)
    prompt = [{"role": "user", "content": q}]
    return {"chosen": prompt + [{"role": "assistant", "content": good}],
            "rejected": prompt + [{"role": "assistant", "content": bad}]}


def reward_pairs(n: int, split: str, seed: int = 0) -> list[dict]:
    """``n`` preference records for the reward model, on the prompts PPO will ask (chains, see
    :func:`_q_chain`): as in InstructGPT, a reward model is trained on comparisons of answers to the
    policy's own prompt distribution, with the mistakes the policy makes there."""
    w = _World(random.Random(f"demo-reward-{split}-{seed}"), split)
    return [_reward_one(w) for _ in range(n)]


RL_SKILLS = ("chain", "copy", "one_digit_word", "word", "two_step")


def _rl_one(w: _World, skill: str) -> tuple[str, str | int]:
    if skill == "chain":
        q, _, value = _q_chain(w)
        return q, value
    if skill == "copy":
        q, _, answer, _ = _q_world(w)
        return q, answer
    if skill == "one_digit_word":
        q, _, value = _q_word(w, small=True)
    elif skill == "word":
        q, _, value = _q_word(w, carry=True)
    else:
        q, _, value = _q_word(w, steps=2)
    return q, value


def rl_prompts(n: int, split: str, seed: int = 0, skill: str = "copy") -> list[dict]:
    """``n`` MiniMind RLAIF records with a verifiable ``gt``. ``skill`` (one of :data:`RL_SKILLS`):
    ``copy`` = a name, colour or place stated in the question; ``one_digit_word`` = one-step word
    problems with one-digit numbers; ``word`` = one-step word problems with a two-digit carry or
    borrow; ``two_step`` = two-step word problems."""
    if skill not in RL_SKILLS:
        raise ValueError(f"rl skill {skill!r}: expected one of {', '.join(RL_SKILLS)}")
    w = _World(random.Random(f"demo-rl-{split}-{seed}-{skill}"), split)
    out = []
    for _ in range(n):
        q, value = _rl_one(w, skill)
        out.append({
            "conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": ""}],
            "gt": [str(value)],
        })
    return out


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)


DEMO_FILES = ("pretrain_train", "pretrain_eval", "sft_train", "sft_eval", "dpo_train", "dpo_eval",
              "reward_train", "reward_eval", "rl_train", "rl_eval")


def is_current(manifest_path: Path, manifest: dict, files: Iterable[Path]) -> bool:
    """True when every file exists and the manifest on disk equals `manifest` (version + sizes):
    then a demo writer has nothing to rewrite."""
    if not manifest_path.is_file() or not all(p.is_file() for p in files):
        return False
    try:
        return json.loads(manifest_path.read_text()) == manifest
    except json.JSONDecodeError:
        return False


def write_demo_data(out_dir: str | Path, sizes: DemoSizes | None = None) -> dict[str, Path]:
    """Write the demo world as MiniMind jsonl files and return ``{"pretrain_train": Path, ...}``.

    Files: ``{pretrain,sft,dpo,rl}_{train,eval}.jsonl`` in ``out_dir`` plus ``demo_manifest.json``.
    Idempotent: when the manifest records the same :data:`DEMO_VERSION` and ``sizes`` and every
    file exists, nothing is rewritten.
    """
    sizes = sizes or DemoSizes()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / f"{name}.jsonl" for name in DEMO_FILES}
    manifest_path = out_dir / "demo_manifest.json"
    manifest = {"version": DEMO_VERSION, "sizes": asdict(sizes)}
    if is_current(manifest_path, manifest, paths.values()):
        return paths
    seed = sizes.seed
    for split in ("train", "eval"):
        texts = pretrain_texts(getattr(sizes, f"pretrain_{split}"), split, seed)
        _write_jsonl(paths[f"pretrain_{split}"], ({"text": t} for t in texts))
        _write_jsonl(paths[f"sft_{split}"], sft_conversations(getattr(sizes, f"sft_{split}"), split, seed))
        _write_jsonl(paths[f"dpo_{split}"], dpo_pairs(getattr(sizes, f"dpo_{split}"), split, seed))
        _write_jsonl(paths[f"reward_{split}"], reward_pairs(getattr(sizes, f"reward_{split}"), split, seed))
        rl = rl_prompts(getattr(sizes, f"rl_{split}"), split, seed, sizes.rl_skill)
        _write_jsonl(paths[f"rl_{split}"], rl)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return paths


def tokenizer_corpus(out_dir: str | Path, sizes: DemoSizes | None = None) -> Iterator[str]:
    """Every *train* text of the demo world, for training the tokenizer: each pretraining
    document, then each message content of the SFT, DPO, reward and RL train files (written first if
    missing), then the words of the train picture records (:func:`dataset.demo_vision.vision_texts`).
    Eval files are left out so the tokenizer never sees held-out text."""
    from dataset.demo_vision import vision_texts  # late: demo_vision imports this module

    paths = write_demo_data(out_dir, sizes)
    for stage, key in (("pretrain_train", None), ("sft_train", "conversations"),
                       ("dpo_train", "chosen"), ("dpo_train", "rejected"), ("reward_train", "chosen"),
                       ("reward_train", "rejected"), ("rl_train", "conversations")):
        with paths[stage].open(encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                if key is None:
                    yield record["text"]
                elif key == "rejected":
                    yield record[key][-1]["content"]
                else:
                    yield from (m["content"] for m in record[key] if m["content"])
    yield from vision_texts(out_dir)
