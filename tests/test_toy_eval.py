"""The toy GenEval's judgements (`harmon.toy.eval.score_scene`) on hand-made scorer readings: each category and
attribute flips on exactly the mistake it is about."""

from __future__ import annotations

import pytest

from harmon.toy.data import Digit, Scene
from harmon.toy.eval import ATTRIBUTES, CATEGORIES, EMPTY, score_scene

ONE = Scene((Digit(3, "red", "left"),))
TWO = Scene((Digit(3, "red", "left"), Digit(7, "blue", "right")))
EMPTY_SLOT = (EMPTY, None)


@pytest.mark.parametrize(
    "scene, reading, expected",
    [
        # one digit, drawn as asked
        (ONE, {"left": (3, "red"), "right": EMPTY_SLOT},
         dict(single_object=True, colors=True, counting=True, position=True, layout=True, slot_colour=True)),
        # the right digit and colour on the wrong side: only position and layout fail
        (ONE, {"left": EMPTY_SLOT, "right": (3, "red")},
         dict(single_object=True, colors=True, counting=True, position=False, layout=False, slot_colour=False)),
        # the right place and colour, another digit: the attributes hold, every digit-naming category fails
        (ONE, {"left": (8, "red"), "right": EMPTY_SLOT},
         dict(single_object=False, colors=False, counting=True, position=False, layout=True, slot_colour=True)),
        # the right digit in the wrong colour
        (ONE, {"left": (3, "green"), "right": EMPTY_SLOT},
         dict(single_object=True, colors=False, counting=True, position=True, layout=True, slot_colour=False)),
        # a second, unasked digit: counting and layout fail
        (ONE, {"left": (3, "red"), "right": (5, "white")},
         dict(single_object=True, colors=True, counting=False, position=True, layout=False, slot_colour=True)),
        # two digits, swapped sides and colours kept with their digits
        (TWO, {"left": (7, "blue"), "right": (3, "red")},
         dict(two_objects=True, color_attribution=True, counting=True, position=False, layout=True,
              slot_colour=False)),
        # two digits, the colours swapped between them
        (TWO, {"left": (3, "blue"), "right": (7, "red")},
         dict(two_objects=True, color_attribution=False, counting=True, position=True, layout=True,
              slot_colour=False)),
        # two asked, one drawn
        (TWO, {"left": (3, "red"), "right": EMPTY_SLOT},
         dict(two_objects=False, color_attribution=False, counting=False, position=False, layout=False,
              slot_colour=False)),
    ],
)
def test_score_scene_judges_each_mistake(scene, reading, expected):
    assert score_scene(scene, reading) == expected


def test_every_judgement_is_a_category_or_an_attribute():
    judged = set(score_scene(ONE, {"left": (3, "red"), "right": EMPTY_SLOT}))
    judged |= set(score_scene(TWO, {"left": (3, "red"), "right": (7, "blue")}))
    assert judged == set(CATEGORIES) | set(ATTRIBUTES)
