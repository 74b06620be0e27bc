"""Filling M x M tiles so every row and every column gets an exact count (transposable N:M masks).

A transposable N:M tile has N non-zeros in each row and each column: a bipartite b-matching between
the tile's rows and columns. Hubara et al. (2021) solve the best one by min-cost flow and note that a
greedy pass (cells by descending score, taken while their row and column have room) is a
2-approximation of its score; the greedy pass alone can get stuck short of N in some row, though. So
`fill` runs the greedy pass and then completes every tile exactly with augmenting paths (the flow's
own repair step: add a cell in a short row, drop a cell it displaces in that column, add one in the
dropped cell's row, ..., until a column that was short). Both run vectorised over all tiles at once:
at most M^2 greedy steps, then at most (cells still missing per tile) rounds of a breadth-first search of
depth <= M.

    fill(score, allowed, need_rows, need_cols)  -> (T, M, M) bool, the cells to add

A completion exists whenever some set of allowed cells has the needed counts (at mask creation, any
N-regular tile; at a mask update, the cells just dropped), and then `fill` finds one.
"""
import math

import torch


def fill(score: torch.Tensor, allowed: torch.Tensor, need_rows: torch.Tensor, need_cols: torch.Tensor
         ) -> torch.Tensor:
    """Cells to add to each of T tiles: a subset of `allowed` (T, M, M) with `need_rows` (T, M) cells
    in each row and `need_cols` (T, M) in each column, preferring high `score` (T, M, M) greedily.
    Raises ValueError when some tile has no such subset."""
    t, m, _ = score.shape
    need_rows, need_cols = need_rows.long().clone(), need_cols.long().clone()
    if not torch.equal(need_rows.sum(1), need_cols.sum(1)):
        raise ValueError("a tile needs a different number of cells by rows than by columns")
    chosen = _greedy(score, allowed, need_rows, need_cols)
    _augment(chosen, allowed, need_rows, need_cols)
    return chosen


def _greedy(score, allowed, need_rows, need_cols) -> torch.Tensor:
    """Take cells by descending score while their row and column still need one (updates the needs).
    Every M steps the tiles that need nothing more leave the loop."""
    t, m, _ = score.shape
    order = score.masked_fill(~allowed, -math.inf).reshape(t, m * m).argsort(dim=1, descending=True, stable=True)
    base = torch.arange(t)[None, :] * m
    rows = ((order // m).t() + base).contiguous()       # (M*M, T): step j's cell's row, flat in need_rows
    cols = ((order % m).t() + base).contiguous()
    ok = allowed.reshape(t, m * m).gather(1, order).t().contiguous()
    need_r, need_c = need_rows.view(-1), need_cols.view(-1)   # views: the updates reach the caller
    taken = torch.zeros(m * m, t, dtype=torch.bool)
    live = (need_rows.sum(1) > 0).nonzero().squeeze(1)  # tiles still in the loop
    for j in range(m * m):
        if j % m == 0:
            live = live[need_rows.index_select(0, live).sum(1) > 0]
            if live.numel() == 0:
                break
        # index_select / index_add_, not x[idx]: these are ~5x faster for the many small steps
        r, c = rows[j].index_select(0, live), cols[j].index_select(0, live)
        take = ok[j].index_select(0, live) & (need_r.index_select(0, r) > 0) & (need_c.index_select(0, c) > 0)
        taken[j].index_copy_(0, live, take)
        need_r.index_add_(0, r, take.long(), alpha=-1)
        need_c.index_add_(0, c, take.long(), alpha=-1)
    return torch.zeros(t, m * m, dtype=torch.bool).scatter_(1, order, taken.t()).view(t, m, m)


def _augment(chosen, allowed, need_rows, need_cols):
    """Complete every tile in place: one augmenting path per unfinished tile per round."""
    while True:
        todo = (need_rows.sum(1) > 0).nonzero().squeeze(1)
        if todo.numel() == 0:
            return
        sub, short_rows = chosen[todo], need_rows[todo] > 0
        end, col_parent, row_parent = _search(sub, allowed[todo], short_rows, need_cols[todo] > 0)
        if (end < 0).any():
            raise ValueError(f"{int((end < 0).sum())} tiles cannot be completed with the allowed cells")
        source = _flip_paths(sub, end, col_parent, row_parent, short_rows)
        chosen[todo] = sub
        need_rows[todo, source] -= 1
        need_cols[todo, end] -= 1


def _search(chosen, allowed, short_rows, short_cols):
    """Breadth-first search, in every tile at once, from the short rows: row -> column over an allowed
    cell not chosen, column -> row over a chosen cell. Returns (end (T,): the short column reached or
    -1, col_parent (T, M): the row each column was reached from, row_parent (T, M): the column each
    row was reached from)."""
    t, m, _ = chosen.shape
    free = allowed & ~chosen                                   # (T, M, M) cells a path may add
    frontier = short_rows.clone()                              # (T, M) rows
    row_seen, col_seen = short_rows.clone(), torch.zeros_like(short_rows)
    col_parent = torch.full((t, m), -1, dtype=torch.long)
    row_parent = torch.full((t, m), -1, dtype=torch.long)
    end = torch.full((t,), -1, dtype=torch.long)
    for _ in range(m):
        reach = frontier[:, :, None] & free & ~col_seen[:, None, :]      # (T, rows, cols)
        new_cols = reach.any(1) & (end < 0)[:, None]                     # (T, cols)
        col_parent = torch.where(new_cols, _first(reach, 1), col_parent)
        col_seen |= new_cols
        hit = new_cols & short_cols
        found = hit.any(1) & (end < 0)
        end = torch.where(found, _first(hit, 1), end)
        back = new_cols[:, None, :] & chosen & ~row_seen[:, :, None]     # (T, rows, cols)
        new_rows = back.any(2) & (end < 0)[:, None]                      # (T, rows)
        row_parent = torch.where(new_rows, _first(back, 2), row_parent)
        row_seen |= new_rows
        frontier = new_rows
        if not frontier.any():
            break
    return end, col_parent, row_parent


def _first(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Index of the first True along `dim` (M if none): the largest of (M - index) over True entries,
    an integer max, which is several times faster than argmax over bools."""
    m = x.shape[dim]
    shape = [1] * x.dim()
    shape[dim] = m
    weight = torch.arange(m, 0, -1, dtype=torch.uint8).view(shape)     # M, M-1, ..., 1
    return m - (x.to(torch.uint8) * weight).amax(dim).long()


def _flip_paths(chosen, end, col_parent, row_parent, short_rows) -> torch.Tensor:
    """Flip each tile's path in place, walking back from its end column: add (row, col) for the row
    the column was reached from; stop if that row is short (the path's source), else drop the chosen
    cell (row, prev) it was reached over and continue from column prev. Returns the source rows."""
    t, m = col_parent.shape
    tiles = torch.arange(t)
    col, live, source = end.clone(), torch.ones(t, dtype=torch.bool), torch.zeros_like(end)
    for _ in range(m):
        row = col_parent[tiles, col]
        chosen[tiles[live], row[live], col[live]] = True
        at_source = live & short_rows[tiles, row]
        source = torch.where(at_source, row, source)
        live &= ~at_source
        if not live.any():
            return source
        col = row_parent[tiles, row].clamp(min=0)
        chosen[tiles[live], row[live], col[live]] = False
    raise AssertionError("an augmenting path is longer than the tile")
