"""Redis Index: the same semantics as MemoryIndex, shared by every kvstore replica.

Every operation is one Lua script, so it is one round trip and atomic. Keys (``P`` is the
configurable prefix):

- ``P:b:<namespace>|<hash hex>``  hash pod -> generation: who holds the block;
- ``P:lru``      sorted set of "<namespace>|<hash hex>" by last use (logical clock ``P:clock``);
- ``P:pods``     hash pod -> "<incarnation>:<epoch>" (the current generation);
- ``P:leases``   sorted set of pods by lease expiry;
- ``P:stats``    hash of counters (lookups, hit_blocks, evictions).

NOTE: the scripts build key names from the prefix, so a Redis Cluster is not supported; use a
single primary (with replicas for availability).
"""

import redis.asyncio as aioredis

from services.kvstore.index import IndexStats, Registration
from tandem.ids import PodId
from tandem.kv.hashing import BlockHash

_GENERATION_OK = """
local function current_generation(P, pod, inc)
  local gen = redis.call('HGET', P..':pods', pod)
  if gen and string.sub(gen, 1, #inc + 1) == inc..':' then return gen end
  return nil
end
"""

# Scores within one call lie in (base, base + 1), earlier blocks of the chain higher (more recent).
_TOUCH = """
local function score(base, index, total) return base + (total - index + 1) / (total + 2) end
"""

HEARTBEAT = """
local P, pod, inc, lease, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local gen = redis.call('HGET', P..':pods', pod)
local known = gen and string.sub(gen, 1, #inc + 1) == inc..':'
if not known then redis.call('HSET', P..':pods', pod, inc..':0') end
redis.call('ZADD', P..':leases', now + lease, pod)
if known then return 1 else return 0 end
"""

LOOKUP = _TOUCH + """
local P, now, ns = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local live = {}
for _, pod in ipairs(redis.call('ZRANGEBYSCORE', P..':leases', '('..now, '+inf')) do
  live[pod] = redis.call('HGET', P..':pods', pod)
end
local total = #ARGV - 3
local base = redis.call('INCR', P..':clock')
local counts, active, hit = {}, nil, 0
for i = 1, total do
  local member = ns..'|'..ARGV[i + 3]
  local holders = redis.call('HGETALL', P..':b:'..member)
  local still = {}
  local any = false
  for j = 1, #holders, 2 do
    local pod = holders[j]
    if live[pod] == holders[j + 1] and (active == nil or active[pod]) then
      still[pod] = true
      any = true
    end
  end
  if not any then break end
  active, hit = still, i
  for pod in pairs(active) do counts[pod] = i end
  redis.call('ZADD', P..':lru', score(base, i, total), member)
end
redis.call('HINCRBY', P..':stats', 'lookups', 1)
redis.call('HINCRBY', P..':stats', 'hit_blocks', hit)
local out = {}
for pod, n in pairs(counts) do
  out[#out + 1] = pod
  out[#out + 1] = n
end
return out
"""

ADD = _GENERATION_OK + _TOUCH + """
local P, ns, pod, inc, capacity = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local gen = current_generation(P, pod, inc)
if not gen then return -1 end
local total = #ARGV - 5
local base = redis.call('INCR', P..':clock')
for i = 1, total do
  local member = ns..'|'..ARGV[i + 5]
  redis.call('HSET', P..':b:'..member, pod, gen)
  redis.call('ZADD', P..':lru', score(base, i, total), member)
end
local n = redis.call('ZCARD', P..':lru')
if n <= capacity then return 0 end
local victims = redis.call('ZRANGE', P..':lru', 0, n - capacity - 1)
for _, member in ipairs(victims) do redis.call('DEL', P..':b:'..member) end
redis.call('ZREMRANGEBYRANK', P..':lru', 0, n - capacity - 1)
redis.call('HINCRBY', P..':stats', 'evictions', #victims)
return #victims
"""

REMOVE = _GENERATION_OK + """
local P, ns, pod, inc = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if not current_generation(P, pod, inc) then return -1 end
for i = 5, #ARGV do
  local member = ns..'|'..ARGV[i]
  local key = P..':b:'..member
  redis.call('HDEL', key, pod)
  if redis.call('HLEN', key) == 0 then
    redis.call('DEL', key)
    redis.call('ZREM', P..':lru', member)
  end
end
return 0
"""

CLEAR_POD = _GENERATION_OK + """
local P, pod, inc = ARGV[1], ARGV[2], ARGV[3]
local gen = current_generation(P, pod, inc)
if not gen then return -1 end
local epoch = tonumber(string.sub(gen, #inc + 2))
redis.call('HSET', P..':pods', pod, inc..':'..(epoch + 1))
return 0
"""

SWEEP = """
local P, now, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local live = {}
for _, pod in ipairs(redis.call('ZRANGEBYSCORE', P..':leases', '('..now, '+inf')) do
  live[pod] = redis.call('HGET', P..':pods', pod)
end
local deleted = 0
for _, member in ipairs(redis.call('ZRANGE', P..':lru', 0, limit - 1)) do
  local key = P..':b:'..member
  local holders = redis.call('HGETALL', key)
  for j = 1, #holders, 2 do
    if live[holders[j]] ~= holders[j + 1] then redis.call('HDEL', key, holders[j]) end
  end
  if redis.call('HLEN', key) == 0 then
    redis.call('DEL', key)
    redis.call('ZREM', P..':lru', member)
    deleted = deleted + 1
  end
end
return deleted
"""

STATS = """
local P, now = ARGV[1], tonumber(ARGV[2])
local s = redis.call('HGETALL', P..':stats')
local out = {redis.call('ZCARD', P..':lru'), redis.call('ZCOUNT', P..':leases', '('..now, '+inf')}
for i = 1, #s do out[#out + 1] = s[i] end
return out
"""


class RedisIndex:
    def __init__(self, client: aioredis.Redis, *, capacity: int, prefix: str = "tandem") -> None:
        self.client = client
        self.capacity = capacity
        self.prefix = prefix
        self._scripts = {
            name: client.register_script(src)
            for name, src in (("heartbeat", HEARTBEAT), ("lookup", LOOKUP), ("add", ADD), ("remove", REMOVE),
                              ("clear", CLEAR_POD), ("sweep", SWEEP), ("stats", STATS))
        }

    async def _run(self, name: str, *args) -> object:
        return await self._scripts[name](keys=[], args=[self.prefix, *args])

    async def heartbeat(self, pod: PodId, incarnation: str, lease_s: float, now: float) -> Registration:
        known = await self._run("heartbeat", pod, incarnation, lease_s, now)
        return Registration(known=bool(known))

    async def lookup(self, namespace: str, hashes: list[BlockHash], now: float) -> dict[PodId, int]:
        flat = await self._run("lookup", now, namespace, *(h.hex() for h in hashes))
        return {PodId(_text(flat[i])): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def add(self, namespace: str, pod: PodId, incarnation: str, hashes: list[BlockHash], now: float) -> bool:
        result = await self._run("add", namespace, pod, incarnation, self.capacity, *(h.hex() for h in hashes))
        return int(result) >= 0

    async def remove(self, namespace: str, pod: PodId, incarnation: str, hashes: list[BlockHash]) -> bool:
        return int(await self._run("remove", namespace, pod, incarnation, *(h.hex() for h in hashes))) >= 0

    async def clear_pod(self, pod: PodId, incarnation: str) -> bool:
        return int(await self._run("clear", pod, incarnation)) >= 0

    async def sweep(self, now: float, max_entries: int) -> int:
        return int(await self._run("sweep", now, max_entries))

    async def stats(self, now: float) -> IndexStats:
        out = await self._run("stats", now)
        counters = {_text(out[i]): int(out[i + 1]) for i in range(2, len(out), 2)}
        return IndexStats(
            num_entries=int(out[0]), capacity=self.capacity, live_pods=int(out[1]),
            lookups=counters.get("lookups", 0), hit_blocks=counters.get("hit_blocks", 0),
            evictions=counters.get("evictions", 0),
        )


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
