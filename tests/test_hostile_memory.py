"""What one scientist can make a node hold in memory: uploads one at a time, caches bounded in bytes.

Before, one scientist's eight parallel 512 MiB uploads were read at once (each body and its parsed
tensors in memory), and the cache of recent weights kept the last four blobs whatever their size.
"""

import asyncio

from voxgrid.nodes.http.app import MAX_UPLOADS, UploadSlots
from voxgrid.nodes.service.node import BlobCache, Caller


def test_a_callers_uploads_are_read_one_at_a_time_and_all_together_bounded():
    async def run():
        slots, inside, peak, peak_mine = UploadSlots(), [], [0], [0]

        async def upload(name):
            async with slots.slot(Caller(name, "scientist")):
                inside.append(name)
                peak[0] = max(peak[0], len(inside))
                peak_mine[0] = max(peak_mine[0], inside.count("mallory"))
                await asyncio.sleep(0.01)
                inside.remove(name)

        await asyncio.gather(*[upload("mallory") for _ in range(8)], *[upload(f"s{i}") for i in range(8)])
        return peak[0], peak_mine[0]

    peak, peak_mine = asyncio.run(run())
    assert peak_mine == 1 and 1 < peak <= MAX_UPLOADS


def test_the_blob_cache_is_bounded_in_bytes_not_only_in_count():
    cache = BlobCache(keep=4, max_bytes=100)
    for key in "abcd":
        cache.put(key, bytes(40))
    assert [k for k in "abcd" if k in cache] == ["c", "d"]  # 80 bytes kept, not 160
    cache.put("big", bytes(150))  # larger than the whole cache: served from disk, not memory
    assert "big" not in cache and "d" not in cache
