"""Prompt shapes for load tests: random lengths, shared system prompts, multi-turn conversations.

Prompts are made of words drawn from a fixed list, so any tokenizer sees realistic text and a
run is reproducible from its seed. A ``Conversation`` belongs to one simulated user.
"""

import random
from dataclasses import dataclass, field

WORDS = (
    "the of and to in is that for it as with was on be by at this from are or an have not which "
    "one cluster router prefill decode token cache block page batch stream request model latency "
    "queue kernel memory network transfer layer attention prompt answer system user chat service "
    "pod node time first second value table index score route shard replica result metric trace "
    "span event"
).split()

WORKLOADS = ("random", "shared-prefix", "multi-turn")


@dataclass
class WorkloadOptions:
    workload: str = "random"
    prompt_words_min: int = 20
    prompt_words_max: int = 200
    system_prompts: int = 4
    """shared-prefix: how many distinct system prompts the users share."""
    system_prompt_words: int = 300
    turns: int = 4
    """multi-turn: turns before a user starts a new conversation."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(
                f"unknown workload {self.workload!r}; choose one of {', '.join(WORKLOADS)}"
            )
        if not 1 <= self.prompt_words_min <= self.prompt_words_max:
            raise ValueError("need 1 <= --prompt-words-min <= --prompt-words-max")
        if self.system_prompts < 1 or self.turns < 1:
            raise ValueError("--system-prompts and --turns must be at least 1")


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def system_prompt(options: WorkloadOptions, index: int) -> str:
    """The shared system prompt number ``index`` (the same in every user and every run)."""
    rng = random.Random(f"system-{options.seed}-{index}")
    return f"You are assistant {index}. " + words(rng, options.system_prompt_words)


@dataclass
class Conversation:
    """One user's stream of requests, as chat messages (completions join them into one prompt)."""

    options: WorkloadOptions
    user_index: int
    rng: random.Random = field(init=False)
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(f"user-{self.options.seed}-{self.user_index}")

    def _question(self) -> str:
        o = self.options
        return words(self.rng, self.rng.randint(o.prompt_words_min, o.prompt_words_max))

    def next_messages(self) -> list[dict]:
        """The messages of the next request."""
        o = self.options
        if o.workload == "multi-turn":
            if not self.messages or len(self.messages) >= 2 * o.turns:
                self.messages = [
                    {
                        "role": "system",
                        "content": system_prompt(o, self.user_index % o.system_prompts),
                    }
                ]
            self.messages.append({"role": "user", "content": self._question()})
            return list(self.messages)
        if o.workload == "shared-prefix":
            shared = system_prompt(o, self.rng.randrange(o.system_prompts))
            return [
                {"role": "system", "content": shared},
                {"role": "user", "content": self._question()},
            ]
        return [{"role": "user", "content": self._question()}]

    def answered(self, text: str) -> None:
        """The assistant's reply to the last request (kept for the next turn of a multi-turn
        chat)."""
        if self.options.workload == "multi-turn":
            self.messages.append({"role": "assistant", "content": text})


def as_prompt(messages: list[dict]) -> str:
    """Messages as one completion prompt (the same prefix sharing as the chat form)."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
