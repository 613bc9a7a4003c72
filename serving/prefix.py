"""Prefix reuse: prompts that begin alike (a system prompt, a few-shot preamble) share the keys
and values of that beginning instead of prefilling it again.

A token's key and value depend on the token, its position and every token before it, so a
full page can be shared exactly when everything up to its end is the same. Each full page is
therefore known by a key that chains its tokens to its parent page's key:

    key(page 0) = (None,        tokens 0-15)
    key(page 1) = (key(page 0), tokens 16-31)     ... and so on: a hash chain, as vLLM's

A new request walks its prompt's chain through a dict of keys, takes the pages it finds by
reference (each page counts the tables that hold it, pages.PagePool.refs) and prefills only
the rest. The alternative, SGLang's radix tree of token sequences, matches to the token rather
than the page and finds the longest match in one walk; the chain is chosen here because pages
are already the unit of memory, a dict is all it needs, and the key, compared whole (a tuple,
not a digest of one), can never make two different prefixes share a page. The price: a key's
hash covers its whole prefix, so matching a prompt of L tokens hashes O(L^2 / page_size)
tokens, cheap beside prefilling it (vLLM hashes each page once, chaining digests instead).

A page is keyed as soon as it is handed to a request whose tokens fill it, and ready once the
forward has written its keys and values; a request whose prompt needs a page that is keyed but
not yet ready waits for it, rather than computing it a second time.

When no table holds a keyed page any more, it is not freed but kept, idle, in case a later
prompt begins the same way; idle pages are taken back, least recently used first, only when
there is no free page left (vLLM and SGLang both evict so).
"""
from collections import OrderedDict


def page_keys(tokens, page_size, parent=None):
    """The chain of keys of the full pages of tokens, continuing from parent's key."""
    keys = []
    for first in range(0, len(tokens) - page_size + 1, page_size):
        parent = (parent, tuple(tokens[first:first + page_size]))
        keys.append(parent)
    return keys


class PrefixCache:
    """Hands out the pool's pages and takes them back, keeping keyed pages for reuse. With
    enabled False it keys nothing: every page is freed when its last table lets go."""

    def __init__(self, pool, enabled=True):
        self.pool, self.enabled = pool, enabled
        self.page_of, self.key_of = {}, {}  # key -> page and page -> key, for keyed pages
        self.ready = set()  # keyed pages whose keys and values are written
        self.idle = OrderedDict()  # keyed, ready pages no table holds, least recently used first

    def available(self):
        """Pages that allocate() can hand out now: the free ones and the idle ones."""
        return len(self.pool.free) + len(self.idle)

    def match(self, keys):
        """(pages, waiting): the pages holding the longest prefix of keys that is ready, and
        whether the next key's page is on its way (keyed, not yet written)."""
        pages = []
        for key in keys:
            page = self.page_of.get(key)
            if page is None:
                return pages, False
            if page not in self.ready:
                return pages, True
            pages.append(page)
        return pages, False

    def hold(self, pages):
        """Take pages (from match) by reference."""
        for page in pages:
            self.pool.refs[page] += 1
            self.idle.pop(page, None)

    def allocate(self):
        """A page for one table: a free one, or else the least recently used idle one."""
        if self.pool.free:
            page = self.pool.free.popleft()
        else:
            page, _ = self.idle.popitem(last=False)
            self.forget(page)
        self.pool.refs[page] = 1
        return page

    def key(self, page, key):
        """Name page, which a table holds and whose tokens key names, for later prompts; a
        page of the same key already known (two rows drew the same tokens) keeps the name."""
        if self.enabled and key not in self.page_of:
            self.page_of[key], self.key_of[page] = page, key

    def written(self, page):
        """The forward has written page's keys and values: a keyed page may now be shared."""
        if page in self.key_of:
            self.ready.add(page)

    def release(self, table):
        """A request lets go of its pages, last first, so that a prefix's tail is evicted
        before its head: a page no table holds goes idle if keyed and ready, else free."""
        for page in reversed(table):
            self.pool.refs[page] -= 1
            assert self.pool.refs[page] >= 0, f"page {page} released more often than held"
            if self.pool.refs[page] == 0:
                if page in self.ready:
                    self.idle[page] = None  # the most recently used, last
                else:
                    self.forget(page)
                    self.pool.free.append(page)

    def forget(self, page):
        key = self.key_of.pop(page, None)
        if key is not None:
            del self.page_of[key]
        self.ready.discard(page)

    def check(self):
        """The allocator's invariants (for tests): every page is held, idle or free, exactly
        one of them; idle pages are keyed and ready; keys and pages name each other."""
        refs, free = self.pool.refs, set(self.pool.free)
        assert len(free) == len(self.pool.free), "a page freed twice"
        for page in range(self.pool.n_pages):
            states = [refs[page] > 0, page in self.idle, page in free]
            assert sum(states) == 1 and refs[page] >= 0, (page, refs[page], states)
            if page in self.idle:
                assert page in self.ready and page in self.key_of, page
        assert all(self.page_of[key] == page for page, key in self.key_of.items())
        assert len(self.page_of) == len(self.key_of) and self.ready <= set(self.key_of)
