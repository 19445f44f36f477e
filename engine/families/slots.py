"""KV-cache slots for continuous batching of the causal families (elm-ar, ctf's first stage,
causal), as vLLM keeps them for text: every image in flight owns rows of one static cache (its
conditional row, and its null row when it uses CFG), each row at its own position. Rows
[0, used) are always occupied: when an image leaves, the last rows move into its place, so a
step runs over the plain slice `cache.rows(0, used)` (no gather) and a new image prefills into
the rows after them."""
from __future__ import annotations


class StepImage:
    """What an image in flight of a categorical family shares: its per-step cfg `scales` (None
    without CFG) and `k` steps done of `num_iter`."""

    scales = None
    k = 0

    @property
    def use_cfg(self) -> bool:
        return self.scales is not None

    @property
    def done(self) -> bool:
        return self.k >= self.num_iter

    @property
    def num_steps(self) -> int:
        return self.num_iter


class SlotPool:
    """Rows of a static KV cache (`new_cache(rows)` allocates one) owned by images in flight.
    An image's rows are `image.rows` (kept up to date when rows move)."""

    def __init__(self, new_cache, initial_rows: int = 8):
        self._new_cache = new_cache
        self._initial = max(1, initial_rows)
        self.cache = None
        self.owner: list = []          # row -> (image, index into image.rows)

    @property
    def used(self) -> int:
        return len(self.owner)

    def claim(self, image, count: int) -> int:
        """`count` rows after the used ones for `image`; returns the first."""
        start = self.used
        self._reserve(start + count)
        image.rows = list(range(start, start + count))
        self.owner += [(image, j) for j in range(count)]
        return start

    def release(self, image) -> None:
        """Frees the image's rows (no-op when it holds none); the last rows fill the holes."""
        for row in sorted(getattr(image, "rows", ()), reverse=True):
            last = self.used - 1
            if row != last:
                self.cache.move_row(last, row)
                moved, j = self.owner[last]
                moved.rows[j] = row
                self.owner[row] = self.owner[last]
            self.owner.pop()
        image.rows = []

    def _reserve(self, rows: int) -> None:
        have = 0 if self.cache is None else self.cache.k.shape[1]
        if rows <= have:
            return
        size = max(self._initial, have)
        while size < rows:
            size *= 2
        grown = self._new_cache(size)
        if self.cache is not None and self.used:
            grown.k[:, :self.used] = self.cache.k[:, :self.used]
            grown.v[:, :self.used] = self.cache.v[:, :self.used]
        self.cache = grown
