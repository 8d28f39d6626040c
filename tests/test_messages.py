"""Messages to users are lines of the project's own: no Python warning with a source path and line, and a line that
repeats (a CV run opens its data once per fold) is counted, not printed again."""
import contextlib
import io
import warnings

import numpy as np

import cohort
import runfiles


def test_too_few_slices_is_a_note_not_a_warning():
    out = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(out):
        warnings.simplefilter("error")  # any warning fails the test
        for _ in range(3):
            drawn = cohort.draw_slices(np.random.default_rng(0), np.arange(5), 20, "val healthy slices (test)")
    assert list(drawn) == [0, 1, 2, 3, 4]
    lines = out.getvalue().splitlines()
    assert lines == ["note: val healthy slices (test): only 5 slices available, 20 asked for; using all"]
    assert "'val healthy slices (test): only 5 slices available, 20 asked...' 3 times" in runfiles.repeated_notes()
