"""Sphinx extension: merge each cell's stream outputs without printing a line twice.

myst-nb (1.4.0) merges a cell's stream outputs (``nb_merge_streams``) by appending to the first
output of each stream *in place*. It reads a cell's outputs more than once, so the second read
finds the first stream already holding the later lines and appends them again: the last line
of every stream showed twice on the built pages. Merging a copy leaves the notebook's outputs as
they were, and each read gives the same result.
"""
import copy

from myst_nb.core import render, utils


def _merge_copies(outputs):
    return utils.coalesce_streams(copy.deepcopy(outputs))


def setup(app):
    render.coalesce_streams = _merge_copies
    return {"parallel_read_safe": True, "parallel_write_safe": True}
