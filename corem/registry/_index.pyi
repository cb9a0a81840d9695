"""The registry's compact hash index (`_index.c`); `compact.PyIndex` is the same in Python."""

class Index:
    """64-bit hashes -> 32-bit row numbers, 12 bytes a slot."""

    def __init__(self) -> None: ...
    def get(self, h: int, /) -> int:
        """The row of hash `h`, or -1."""
    def put(self, h: int, row: int, /) -> int:
        """Map `h` to `row`; the row it replaces, or -1."""
    def pop(self, h: int, /) -> int:
        """Forget `h`; the row it held, or -1."""
    def clear(self) -> None: ...
    def __len__(self) -> int: ...
    @property
    def nbytes(self) -> int:
        """Bytes of its table."""
