"""The pipeline's steps, in ONE table: step name -> Dramatiq actor -> queue -> message statuses.

Everything that needs to know which queue carries which step, which statuses a step owns or
where a dead step's message goes back to reads it here (the chain, the recovery sweep, the
dead-letter tools, ``status``'s queue depths, the broker's declarations).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """One step of the chain."""

    #: the step's one name, used for the actor too (``send_part`` everywhere)
    name: str
    #: the RabbitMQ queue its actor consumes (with ``.DQ`` delays and ``.XQ`` dead letters)
    queue: str
    #: the message statuses the step owns while it works (a dead step settles only these)
    statuses: tuple[str, ...]
    #: the status a message is put back in to run this step again (dead-letter requeue, sweep)
    entry_status: str
    #: whether the actor takes the inbox id after the message id (per-inbox pacing)
    takes_inbox: bool = False
    #: statuses of a later step the actor's delivery also carries (generate splits in the same
    #: delivery): a dead delivery settles these too (campaign.outcomes.fail_exhausted)
    also_carries: tuple[str, ...] = ()

    @property
    def carried(self) -> tuple[str, ...]:
        """Every status a delivery of this step's actor may leave a message in while it works."""
        return self.statuses + self.also_carries

    @property
    def actor(self) -> str:
        """The Dramatiq actor name of the step."""
        return self.name

    def args(self, message_id: int, inbox_id: int | None = None) -> tuple[int, ...]:
        """The actor's arguments for one campaign message."""
        if self.takes_inbox:
            if inbox_id is None:
                raise ValueError(f"{self.name} needs the message's inbox id")
            return (message_id, inbox_id)
        return (message_id,)


GENERATE = Step("generate", "campaign.generate", ("queued", "generating"), "queued", also_carries=("splitting",))
SPLIT = Step("split", "campaign.split", ("splitting",), "splitting")
SEND_PART = Step("send_part", "campaign.send", ("sending",), "sending", takes_inbox=True)

STEPS: tuple[Step, ...] = (GENERATE, SPLIT, SEND_PART)
BY_NAME: dict[str, Step] = {s.name: s for s in STEPS}
BY_QUEUE: dict[str, Step] = {s.queue: s for s in STEPS}
QUEUES: tuple[str, ...] = tuple(s.queue for s in STEPS)
#: every in-flight (non-terminal, dispatched) message status
IN_FLIGHT: tuple[str, ...] = tuple(st for s in STEPS for st in s.statuses)


@dataclass(frozen=True)
class Job:
    """An actor outside the chain, enqueued by name too (it owns no message status)."""

    name: str
    queue: str

    @property
    def actor(self) -> str:
        """The Dramatiq actor name of the job."""
        return self.name


#: the confirmation a workspace sends, once, to a lead who opted out (R-IN-4)
OPT_OUT_REPLY = Job("opt_out_reply", "campaign.notify")
#: the AI triage of one recorded reply (R-IN-5); its argument is a ``reply_triage`` row id
TRIAGE_REPLY = Job("triage_reply", "campaign.triage")
JOBS: tuple[Job, ...] = (OPT_OUT_REPLY, TRIAGE_REPLY)
JOB_QUEUES: tuple[str, ...] = tuple(dict.fromkeys(j.queue for j in JOBS))


def for_status(status: str) -> Step:
    """The step that carries a message in ``status`` on (KeyError for a status no step owns)."""
    for step in STEPS:
        if status in step.statuses:
            return step
    raise KeyError(f"no pipeline step owns status {status!r}")


#: longest wait kept in RabbitMQ: a delayed message sits unacked in a worker and RabbitMQ's
#: consumer timeout (30 min) redelivers it; longer waits are parked in PostgreSQL (R-DISP-2)
MAX_BROKER_DELAY_SECONDS = 600
