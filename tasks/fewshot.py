"""Synthetic few-shot multiple choice: a small analogue of MMLU for comparing in-context learning
(ICL) with supervised fine-tuning (SFT). Pure and seeded.

A prompt is an optional topic header, k demonstrations and a query, each a multiple-choice block::

    [BOS] ([TOPIC] topic_t) { [Q] q q [C] A v B v C v D v [ANS] L }*k  [Q] q q [C] A v B v C v D v [ANS]

and the answer is the letter L of the correct choice. Latents:

- **topic** t (``n_topics``): the two question tokens come from the topic's own vocabulary
  (``question_tokens`` per topic), so the query names its topic;
- **rule** r in 0..3: each choice is a value token whose *class* is ``value mod 4``, the four
  choices have the four classes in random order, and the correct choice is the one of class r;
- **answer letter**: where that choice was put, uniform over A-D (balanced by construction).

Two distributions share the vocabulary:

- *pretraining*: the rule of a prompt is the topic's preferred rule with probability
  ``topic_prior``, else one of the other three; all demonstrations of a prompt share its rule,
  each shown with the right letter with probability ``1 - demo_noise``; 0..``max_shots``
  demonstrations, a header with probability ``header_rate``. A model can only do well by reading
  the rule off the demonstrations (ICL), falling back on the topic's prior with none;
- *benchmark* (evaluation splits ``shots<k>`` and ``train_on=sft``): every topic has a fixed
  benchmark rule drawn independently of its pretraining preference, demonstrations are correct,
  and queries use held-out questions (``heldout_fraction`` of each topic's question pairs never
  appear in a training query).

So at 0 shots on the benchmark a well-pretrained model answers with its topic prior, which is
right only for the topics whose benchmark rule happens to equal their pretraining preference (a
quarter of them in expectation): accuracy near chance. Each correct demonstration is evidence
for the rule: accuracy rises with k. SFT on zero-shot benchmark
prompts (``train_on=sft``) can reach the same accuracy by learning each topic's benchmark rule.
Batches carry ``objects["prior_answer"]``, the token id of the letter the topic's pretraining rule
picks (the memorised answer; the benchmark answer too when the two rules agree), so evaluators can
set the prior against the in-context answer.
Details and the reasoning in docs/fewshot.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tasks.protocol import TaskConfigError
from tasks.vocab import BOS, PAD, Vocab

LETTERS = ("A", "B", "C", "D")
TOPIC, QUESTION, CHOICES, ANSWER = "[TOPIC]", "[Q]", "[C]", "[ANS]"
BLOCK_LEN = 14  # [Q] q q [C] (letter value) x 4 [ANS] letter
MODES = ("pretrain", "sft")


@dataclass
class FewShotSample:
    tokens: list[int]
    answer: int                     # token id of the correct letter
    n_objects: int                  # number of demonstrations (the lab's "problem size" axis)
    query_position: int             # the final [ANS]
    topic: int
    rule: int
    letter: int                     # index of the correct letter
    prior_answer: int = -1          # token id of the letter the topic's pretraining rule picks
    demo_answer_positions: list[int] = field(default_factory=list)   # each demonstration's letter
    header_positions: list[int] = field(default_factory=list)
    query_block: tuple[int, int] = (0, 0)                            # [start, end) of the query block
    # training only: the demonstrations' letters are labelled too (task.train_queries > 1)
    followup_answers: list[tuple[int, int]] = field(default_factory=list)
    # intermediate variables for the optional intermediate-supervision objective, named by the
    # token value_<class>: the prompt's rule at every labelled [ANS], and at each demonstration's
    # shown letter the class of the value that letter points to (what the demonstration says)
    intermediate_labels: list[tuple[int, int]] = field(default_factory=list)

    def roles(self) -> dict[str, list[int]]:
        start, end = self.query_block
        return {
            "header": self.header_positions,
            "demo_answer": self.demo_answer_positions,
            "query_question": [start + 1, start + 2],
            "query_choices": list(range(start + 4, end - 1)),
            "query": [self.query_position],
        }

    def objects(self) -> dict:
        return {"topic": self.topic, "answer_letter": self.letter, "rule": self.rule, "shots": self.n_objects,
                "prior_answer": self.prior_answer}


class FewShotTask:
    """Seeded generator of few-shot multiple-choice prompts (module docstring)."""

    name = "fewshot"
    size_label = "demonstrations (shots)"  # what n_objects counts here (plots)
    has_intermediate = True  # the rule: objective.intermediate can supervise it (docs/fewshot.md)

    def __init__(self, n_topics: int = 16, question_tokens: int = 8, n_values: int = 16, max_shots: int = 5,
                 eval_shots=(0, 1, 2, 5), topic_prior: float = 0.7, demo_noise: float = 0.2,
                 header_rate: float = 0.3, heldout_fraction: float = 0.25, train_on: str = "pretrain",
                 train_queries: int = 1, eval_size: int = 512, seed: int = 0) -> None:
        self.n_topics, self.question_tokens, self.n_values = int(n_topics), int(question_tokens), int(n_values)
        self.max_shots, self.eval_shots = int(max_shots), tuple(int(k) for k in eval_shots)
        self.topic_prior, self.demo_noise, self.header_rate = float(topic_prior), float(demo_noise), float(header_rate)
        self.heldout_fraction, self.train_on = float(heldout_fraction), str(train_on)
        self.train_queries, self.eval_size, self.seed = int(train_queries), int(eval_size), int(seed)
        self._validate()
        self.splits = tuple(f"shots{k}" for k in self.eval_shots)
        self.vocab = Vocab([PAD, BOS, TOPIC, QUESTION, CHOICES, ANSWER, *LETTERS]
                           + [f"value_{i}" for i in range(self.n_values)]
                           + [f"topic_{t}" for t in range(self.n_topics)]
                           + [f"q{t}_{i}" for t in range(self.n_topics) for i in range(self.question_tokens)])
        rng = np.random.default_rng([self.seed, 7])
        self.pretrain_rule = rng.integers(0, 4, self.n_topics)
        self.benchmark_rule = rng.integers(0, 4, self.n_topics)
        self._train_questions, self._heldout_questions = [], []
        for _ in range(self.n_topics):
            pairs = [(a, b) for a in range(self.question_tokens) for b in range(self.question_tokens) if a != b]
            order = rng.permutation(len(pairs))
            n_held = max(1, int(round(self.heldout_fraction * len(pairs))))
            self._heldout_questions.append([pairs[i] for i in order[:n_held]])
            self._train_questions.append([pairs[i] for i in order[n_held:]])
        self._eval_cache: dict[str, list[FewShotSample]] = {}

    def _validate(self) -> None:
        checks = [
            (self.n_topics >= 2, f"task.n_topics must be >= 2, got {self.n_topics}"),
            (self.question_tokens >= 3, f"task.question_tokens must be >= 3 (questions are ordered pairs), got {self.question_tokens}"),
            (self.n_values >= 4 and self.n_values % 4 == 0, f"task.n_values must be a positive multiple of 4 (four value classes), got {self.n_values}"),
            (self.max_shots >= 0, f"task.max_shots must be >= 0, got {self.max_shots}"),
            (len(self.eval_shots) > 0 and all(0 <= k for k in self.eval_shots), f"task.eval_shots must be shot counts >= 0, got {list(self.eval_shots)}"),
            (len(set(self.eval_shots)) == len(self.eval_shots), f"task.eval_shots has repeats: {list(self.eval_shots)}"),
            (0 <= self.topic_prior <= 1, f"task.topic_prior must be in [0, 1], got {self.topic_prior}"),
            (0 <= self.demo_noise < 1, f"task.demo_noise must be in [0, 1), got {self.demo_noise}"),
            (0 <= self.header_rate <= 1, f"task.header_rate must be in [0, 1], got {self.header_rate}"),
            (0 < self.heldout_fraction < 1, f"task.heldout_fraction must be in (0, 1), got {self.heldout_fraction}"),
            (self.train_on in MODES, f"task.train_on must be one of {list(MODES)}, got {self.train_on!r}"),
            (self.train_queries >= 1, f"task.train_queries must be >= 1, got {self.train_queries}"),
            (self.eval_size >= 1, f"task.eval_size must be >= 1, got {self.eval_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise TaskConfigError(message)

    # ------------------------------------------------------------------ protocol
    @property
    def max_objects(self) -> int:
        return max(self.max_shots, *self.eval_shots)

    @property
    def max_prompt_len(self) -> int:
        return 3 + (self.max_objects + 1) * BLOCK_LEN

    def chance_accuracy(self, samples) -> float:
        return 1.0 / len(LETTERS)

    def train_batch(self, step: int, batch_size: int, noise: bool = True) -> list[FewShotSample]:
        """Pretraining prompts (``train_on=pretrain``) or zero-shot benchmark prompts (``sft``)."""
        rng = np.random.default_rng([self.seed, 1, int(step)])
        if self.train_on == "sft":
            return [self.benchmark_sample(rng, shots=0, heldout=False) for _ in range(batch_size)]
        return [self.pretrain_sample(rng) for _ in range(batch_size)]

    def eval_set(self, split: str, noise: bool = True) -> list[FewShotSample]:
        """Benchmark prompts with ``k`` correct demonstrations and a held-out query question."""
        if split not in self.splits:
            raise TaskConfigError(f"unknown split {split!r}; the task has {list(self.splits)}")
        if split not in self._eval_cache:
            shots = int(split.removeprefix("shots"))
            rng = np.random.default_rng([self.seed, 2, shots])
            self._eval_cache[split] = [self.benchmark_sample(rng, shots, heldout=True) for _ in range(self.eval_size)]
        return self._eval_cache[split]

    # ------------------------------------------------------------------ samples
    def pretrain_sample(self, rng: np.random.Generator) -> FewShotSample:
        topic = int(rng.integers(self.n_topics))
        rule = int(self.pretrain_rule[topic])
        if rng.random() >= self.topic_prior:
            rule = int(rng.choice([r for r in range(4) if r != rule]))
        shots = int(rng.integers(0, self.max_shots + 1))
        return self.build(rng, topic, rule, shots, header=bool(rng.random() < self.header_rate),
                          demo_noise=self.demo_noise, heldout=False)

    def benchmark_sample(self, rng: np.random.Generator, shots: int, heldout: bool) -> FewShotSample:
        topic = int(rng.integers(self.n_topics))
        return self.build(rng, topic, int(self.benchmark_rule[topic]), shots, header=False, demo_noise=0.0,
                          heldout=heldout)

    def build(self, rng, topic: int, rule: int, shots: int, header: bool, demo_noise: float, heldout: bool) -> FewShotSample:
        """One prompt: ``shots`` demonstrations of (topic, rule), then the query."""
        tokens = [self.vocab[BOS]]
        header_positions = []
        if header:
            header_positions = [len(tokens), len(tokens) + 1]
            tokens += [self.vocab[TOPIC], self.vocab[f"topic_{topic}"]]
        demo_answers, followups, shown_classes = [], [], []
        for _ in range(shots):
            block, letter, values = self._block(rng, topic, rule, self._train_questions[topic])
            shown = letter if rng.random() >= demo_noise else int(rng.choice([x for x in range(4) if x != letter]))
            start = len(tokens)
            tokens += block + [self.vocab[LETTERS[shown]]]
            demo_answers.append(start + BLOCK_LEN - 1)
            followups.append((start + BLOCK_LEN - 2, self.vocab[LETTERS[shown]]))
            shown_classes.append((start + BLOCK_LEN - 1, self.vocab[f"value_{values[shown] % 4}"]))
        questions = self._heldout_questions[topic] if heldout else self._train_questions[topic]
        block, letter, values = self._block(rng, topic, rule, questions)
        prior_letter = [v % 4 for v in values].index(int(self.pretrain_rule[topic]))
        start = len(tokens)
        tokens += block
        followups = followups if self.train_queries > 1 else []
        rule_token = self.vocab[f"value_{rule}"]
        return FewShotSample(
            tokens=tokens, answer=self.vocab[LETTERS[letter]], n_objects=shots, query_position=len(tokens) - 1,
            topic=topic, rule=rule, letter=letter, prior_answer=self.vocab[LETTERS[prior_letter]],
            demo_answer_positions=demo_answers,
            header_positions=header_positions, query_block=(start, len(tokens)),
            followup_answers=followups,
            intermediate_labels=[(len(tokens) - 1, rule_token)] + [(p, rule_token) for p, _ in followups] + shown_classes,
        )

    def _block(self, rng, topic: int, rule: int, questions) -> tuple[list[int], int, list[int]]:
        """``[Q] q q [C] A v B v C v D v [ANS]``, the index of the letter whose value has class
        ``rule``, and the four choice values (indices, in letter order)."""
        a, b = questions[int(rng.integers(len(questions)))]
        classes = rng.permutation(4)
        values = [int(c) + 4 * int(rng.integers(self.n_values // 4)) for c in classes]
        block = [self.vocab[QUESTION], self.vocab[f"q{topic}_{a}"], self.vocab[f"q{topic}_{b}"], self.vocab[CHOICES]]
        for letter, value in zip(LETTERS, values):
            block += [self.vocab[letter], self.vocab[f"value_{value}"]]
        block.append(self.vocab[ANSWER])
        return block, int(np.flatnonzero(classes == rule)[0]), values
