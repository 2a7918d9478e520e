"""Redis Index: the same semantics as MemoryIndex, shared by every kvstore replica.

Every operation is one Lua script, so it is one round trip and atomic. Keys live under
``P`` = "<configurable prefix>:v2" (a generation id ``G`` is "<len(pod)>:<pod><generation>",
unambiguous whatever characters pod ids hold):

- ``P:b:<namespace>|<hash hex>``  hash pod -> generation: who holds the block;
- ``P:lru``      sorted set of "<namespace>|<hash hex>" by last use (logical clock ``P:clock``);
- ``P:pods``     hash pod -> "<incarnation>:<serial>" (the current generation; serials from
  ``P:serial``, so a generation is never reused);
- ``P:leases``   sorted set of pods by lease expiry;
- ``P:g:<G>``    set of "<namespace>|<hash hex>" the generation holds: exactly the blocks whose
  ``P:b`` hash maps the pod to ``G``'s generation (kept so on add, remove, eviction and drain),
  so a retired generation's entries are found without scanning and its set never outgrows them;
- ``P:dead``     list of retired generation ids whose sets ``SWEEP`` still has to drain;
- ``P:stats``    hash of counters (lookups, hit_blocks, evictions).

The ``v2`` segment versions the schema. The previous release kept its index directly under the
prefix with "<incarnation>:<epoch>" generations and no generation sets; read with these scripts,
its records would let a pod's new generation collide with an old one (a clear that clears
nothing) and leave entries no sweep drains. Under ``v2`` those keys are simply ignored: every
pod is unknown to the new index and resends its cache once. The old keys stay in Redis until
deleted (docs/kubernetes.md, "Upgrade"); they are bounded by the old index's capacity.

NOTE: the scripts build key names from the prefix, so a Redis Cluster is not supported; use a
single primary (with replicas for availability). ``SWEEP`` uses ``SPOP``, which needs Redis >= 5
(scripts replicated by effects).
"""

import redis.asyncio as aioredis

from services.kvstore.index import IndexStats, Registration
from tandem.api.ids import BlockHash, PodId

_GENERATIONS = """
-- The incarnation is everything before the last ':' (incarnations may hold ':' themselves).
local function incarnation_of(gen) return string.match(gen, '^(.*):%d+$') end
local function current_generation(P, pod, inc)
  local gen = redis.call('HGET', P..':pods', pod)
  if gen and incarnation_of(gen) == inc then return gen end
  return nil
end
local function new_generation(P, inc) return inc..':'..redis.call('INCR', P..':serial') end
local function generation_id(pod, gen) return #pod..':'..pod..gen end
local function split_generation_id(id)
  local digits, rest = string.match(id, '^(%d+):(.*)$')
  local n = tonumber(digits)
  return string.sub(rest, 1, n), string.sub(rest, n + 1)
end
local function held_key(P, pod, gen) return P..':g:'..generation_id(pod, gen) end
local function retire(P, pod, gen)
  if redis.call('EXISTS', held_key(P, pod, gen)) == 1 then
    redis.call('RPUSH', P..':dead', generation_id(pod, gen))
  end
end
"""

# Scores within one call lie in (base, base + 1), earlier blocks of the chain higher (more recent).
_TOUCH = """
local function score(base, index, total) return base + (total - index + 1) / (total + 2) end
"""

# Byte order, as Python compares the same strings (Lua's own `<` follows the server's locale).
_ORDER = """
local function older(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
"""

HEARTBEAT = (
    _GENERATIONS
    + _ORDER
    + """
local P, pod, inc, lease, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local gen = redis.call('HGET', P..':pods', pod)
if gen then
  local registered = incarnation_of(gen)
  if registered == inc then
    -- Also renews a lease that expired but was not swept yet, as known: the generation was
    -- never retired and every event of it was applied, so its entries are still exact (a pod
    -- whose events were lost resyncs on its own).
    redis.call('ZADD', P..':leases', now + lease, pod)
    return 1
  end
  local expiry = redis.call('ZSCORE', P..':leases', pod)
  if expiry and tonumber(expiry) > now and older(inc, registered) then return -1 end
  retire(P, pod, gen)
end
redis.call('HSET', P..':pods', pod, new_generation(P, inc))
redis.call('ZADD', P..':leases', now + lease, pod)
return 0
"""
)

LOOKUP = (
    _TOUCH
    + """
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
)

ADD = (
    _GENERATIONS
    + _TOUCH
    + """
local P, ns, pod, inc, capacity = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local gen = current_generation(P, pod, inc)
if not gen then return -1 end
local held = held_key(P, pod, gen)
local total = #ARGV - 5
local base = redis.call('INCR', P..':clock')
for i = 1, total do
  local member = ns..'|'..ARGV[i + 5]
  local old = redis.call('HGET', P..':b:'..member, pod)
  -- The block moves from a retired generation (before a clear or restart) to this one: its old
  -- set must lose it, or every resync would leave a whole cache's worth in retired sets.
  if old and old ~= gen then redis.call('SREM', held_key(P, pod, old), member) end
  redis.call('HSET', P..':b:'..member, pod, gen)
  redis.call('SADD', held, member)
  redis.call('ZADD', P..':lru', score(base, i, total), member)
end
local n = redis.call('ZCARD', P..':lru')
if n <= capacity then return 0 end
local victims = redis.call('ZRANGE', P..':lru', 0, n - capacity - 1)
for _, member in ipairs(victims) do
  local holders = redis.call('HGETALL', P..':b:'..member)
  for j = 1, #holders, 2 do redis.call('SREM', held_key(P, holders[j], holders[j + 1]), member) end
  redis.call('DEL', P..':b:'..member)
end
redis.call('ZREMRANGEBYRANK', P..':lru', 0, n - capacity - 1)
redis.call('HINCRBY', P..':stats', 'evictions', #victims)
return #victims
"""
)

REMOVE = (
    _GENERATIONS
    + """
local P, ns, pod, inc = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if not current_generation(P, pod, inc) then return -1 end
for i = 5, #ARGV do
  local member = ns..'|'..ARGV[i]
  local key = P..':b:'..member
  local had = redis.call('HGET', key, pod)
  if had then
    redis.call('HDEL', key, pod)
    redis.call('SREM', held_key(P, pod, had), member)
    if redis.call('HLEN', key) == 0 then
      redis.call('DEL', key)
      redis.call('ZREM', P..':lru', member)
    end
  end
end
return 0
"""
)

CLEAR_POD = (
    _GENERATIONS
    + """
local P, pod, inc = ARGV[1], ARGV[2], ARGV[3]
local gen = current_generation(P, pod, inc)
if not gen then return -1 end
retire(P, pod, gen)
redis.call('HSET', P..':pods', pod, new_generation(P, inc))
return 0
"""
)

# Step 1 retires pods whose lease expired (their records go: a returning pod resyncs); step 2
# pops up to `limit` holdings of the oldest retired generations and deletes those still current.
SWEEP = (
    _GENERATIONS
    + """
local P, now, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
for _, pod in ipairs(redis.call('ZRANGEBYSCORE', P..':leases', '-inf', now, 'LIMIT', 0, limit)) do
  local gen = redis.call('HGET', P..':pods', pod)
  if gen then retire(P, pod, gen) end
  redis.call('HDEL', P..':pods', pod)
  redis.call('ZREM', P..':leases', pod)
end
local deleted, budget = 0, limit
while budget > 0 do
  local id = redis.call('LINDEX', P..':dead', 0)
  if not id then break end
  local pod, gen = split_generation_id(id)
  local members = redis.call('SPOP', P..':g:'..id, budget)
  for _, member in ipairs(members) do
    local key = P..':b:'..member
    if redis.call('HGET', key, pod) == gen then
      redis.call('HDEL', key, pod)
      if redis.call('HLEN', key) == 0 then
        redis.call('DEL', key)
        redis.call('ZREM', P..':lru', member)
        deleted = deleted + 1
      end
    end
  end
  budget = budget - math.max(#members, 1)
  if redis.call('EXISTS', P..':g:'..id) == 0 then redis.call('LPOP', P..':dead') end
end
return deleted
"""
)

STATS = """
local P, now = ARGV[1], tonumber(ARGV[2])
local s = redis.call('HGETALL', P..':stats')
local out = {redis.call('ZCARD', P..':lru'), redis.call('ZCOUNT', P..':leases', '('..now, '+inf'),
             redis.call('LLEN', P..':dead')}
for i = 1, #s do out[#out + 1] = s[i] end
return out
"""


SCHEMA = "v2"
"""Version segment of every key name (see the module docstring)."""


class RedisIndex:
    def __init__(self, client: aioredis.Redis, *, capacity: int, prefix: str = "tandem") -> None:
        self.client = client
        self.capacity = capacity
        self.prefix = prefix
        self.root = f"{prefix}:{SCHEMA}"
        """``P`` of the key names: the prefix and the schema version."""
        self._scripts = {
            name: client.register_script(src)
            for name, src in (
                ("heartbeat", HEARTBEAT),
                ("lookup", LOOKUP),
                ("add", ADD),
                ("remove", REMOVE),
                ("clear", CLEAR_POD),
                ("sweep", SWEEP),
                ("stats", STATS),
            )
        }

    async def _run(self, name: str, *args) -> object:
        return await self._scripts[name](keys=[], args=[self.root, *args])

    async def heartbeat(
        self, pod: PodId, incarnation: str, lease_s: float, now: float
    ) -> Registration:
        result = int(await self._run("heartbeat", pod, incarnation, lease_s, now))
        return Registration(known=result == 1, superseded=result < 0)

    async def lookup(self, namespace: str, hashes: list[BlockHash], now: float) -> dict[PodId, int]:
        flat = await self._run("lookup", now, namespace, *(h.hex() for h in hashes))
        return {PodId(_text(flat[i])): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def add(
        self, namespace: str, pod: PodId, incarnation: str, hashes: list[BlockHash], now: float
    ) -> bool:
        result = await self._run(
            "add", namespace, pod, incarnation, self.capacity, *(h.hex() for h in hashes)
        )
        return int(result) >= 0

    async def remove(
        self, namespace: str, pod: PodId, incarnation: str, hashes: list[BlockHash]
    ) -> bool:
        return (
            int(await self._run("remove", namespace, pod, incarnation, *(h.hex() for h in hashes)))
            >= 0
        )

    async def clear_pod(self, pod: PodId, incarnation: str) -> bool:
        return int(await self._run("clear", pod, incarnation)) >= 0

    async def sweep(self, now: float, max_entries: int) -> int:
        return int(await self._run("sweep", now, max_entries))

    async def stats(self, now: float) -> IndexStats:
        out = await self._run("stats", now)
        counters = {_text(out[i]): int(out[i + 1]) for i in range(3, len(out), 2)}
        return IndexStats(
            num_entries=int(out[0]),
            capacity=self.capacity,
            live_pods=int(out[1]),
            lookups=counters.get("lookups", 0),
            hit_blocks=counters.get("hit_blocks", 0),
            evictions=counters.get("evictions", 0),
            retired_generations=int(out[2]),
        )


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
