"""Task families that need no topics and no code of their own beyond the two engines.

TSK task lists (step 1 makes tasks, step 2 answers each accepted task):

* ``cot``: problems that ask for several solutions, a ranking and a best answer; the
  answers use ``cot_response.txt`` (worked examples of that layout).
* ``plan``: ReWOO-style tool plans (``Plan:`` / ``#E1 = Tool[input]`` or ``:evidence0:``);
  the raw task is sent as the response prompt.
* ``roleplay``: "answer in the style of <character>" requests; raw task sent.
* ``song``: lyric-writing requests; raw task sent.

Inline pairs (one call returns instruction and response together):

* ``misconception``: ``QUESTION:``/``ANSWER:`` pairs that correct a widespread false belief.
* ``card``: ``PROMPT:``/``ANSWER:`` pairs: a request for a character/scenario card with
  named attributes, and the card as ``Attribute: value`` lines.

As in the original, none of them injects topics (diversity comes from temperature and
dedupe), and cot and plan skip the refusal filter on both calls (reference §1.3): a
worked solution or a plan legitimately contains phrases the filter would reject.
"""

from __future__ import annotations

from airoboros.generator.instructors.base import InlineInstructor, Instructor, TaskListInstructor


class Cot(TaskListInstructor):
    name = "cot"
    response_prompt_file = "cot_response.txt"
    filter_responses = False
    filter_task_responses = False


class Plan(TaskListInstructor):
    name = "plan"
    filter_responses = False
    filter_task_responses = False


class Roleplay(TaskListInstructor):
    name = "roleplay"


class Song(TaskListInstructor):
    name = "song"


class Misconception(InlineInstructor):
    name = "misconception"


class Card(InlineInstructor):
    name = "card"
    start_key = "PROMPT"
    end_key = "ANSWER"
    topic_label = "PROMPT"


SIMPLE_INSTRUCTORS: list[type[Instructor]] = [Cot, Plan, Roleplay, Song, Misconception, Card]
