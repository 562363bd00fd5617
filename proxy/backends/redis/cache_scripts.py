"""The read cache's Lua scripts in Redis: the fence, get, put, invalidate, flush and probe."""

from __future__ import annotations

from typing import Final

from proxy.backends.redis.client import Script

__all__ = ["CHUNK", "FLUSH", "FLUSH_ALL", "GET", "INVALIDATE", "PROBE", "PUT"]

FLUSH_ALL: Final = b"*"  # the pub/sub payload meaning "everything is invalid"
CHUNK: Final = 256  # keys per invalidation script call

# Every script starts with the fence. KEYS[1] the generation, KEYS[2] the heartbeat (Redis
# TIME in ms of the last script run); ARGV[1] the channel, ARGV[2] the longest gap in ms.
# A gap longer than that (Redis frozen, or restarted with persisted entries), or no
# heartbeat, voids every entry and ticket (a new generation, above any earlier one) and
# tells every sidecar to forget its near cache, BEFORE this script does its own work. With
# no generation either (a new or emptied Redis) there is nothing to void, but the new
# generation is still above any ticket an earlier instance handed out (see
# docs/cache-coherence.md).
_FENCE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local had = redis.call('GET', KEYS[1])
local gen = tonumber(had or '0')
local hb = tonumber(redis.call('GET', KEYS[2]))
if not hb or now - hb > tonumber(ARGV[2]) then
  gen = math.max(gen + 1, now)
  redis.call('SET', KEYS[1], string.format('%.0f', gen))
  if had then redis.call('PUBLISH', ARGV[1], '*') end
end
if not hb or now > hb then redis.call('SET', KEYS[2], string.format('%.0f', now)) end
"""

# KEYS[3] the entry. A hit: {1, version, value, ms left}; a miss: {0, now_ms, gen} (the
# fill ticket). An entry from an older generation is a miss.
GET_LUA: Final = (
    _FENCE
    + """
local e = redis.call('HMGET', KEYS[3], 'v', 'd', 'x', 'g')
if e[1] and e[2] and tonumber(e[4]) == gen then
  local left = tonumber(e[3]) - now
  if left > 0 then return {1, e[1], e[2], left} end
end
return {0, now, gen}
"""
)

# KEYS[3] the entry; ARGV[3..8]: version, value, ttl_ms, ticket_ms ('' for none), ticket_gen,
# window_ms. Returns 1 stored, 2 this version is already there, 0 refused.
PUT_LUA: Final = (
    _FENCE
    + """
local version = tonumber(ARGV[3])
if ARGV[6] ~= '' then
  if tonumber(ARGV[7]) ~= gen then return 0 end
  if now - tonumber(ARGV[6]) >= tonumber(ARGV[8]) then return 0 end
end
local e = redis.call('HMGET', KEYS[3], 'v', 'x', 'g', 't')
local floor = tonumber(e[4])
if floor and floor > version then return 0 end
if e[1] and tonumber(e[3]) == gen and tonumber(e[2]) > now then
  local have = tonumber(e[1])
  if have > version then return 0 end
  if have == version then return 2 end
end
local ttl = tonumber(ARGV[5])
local keep = ttl
if floor then
  local left = redis.call('PTTL', KEYS[3])
  if left > keep then keep = left end
end
redis.call('HSET', KEYS[3], 'v', ARGV[3], 'd', ARGV[4], 'x', string.format('%.0f', now + ttl),
           'g', string.format('%.0f', gen))
redis.call('PEXPIRE', KEYS[3], keep)
return 1
"""
)

# KEYS[3..] the entries; ARGV[3] payload, ARGV[4] tombstone life in ms, ARGV[4+i] the
# written version of KEYS[2+i]. Deletes, leaves tombstones, publishes: atomic.
INVALIDATE_LUA: Final = (
    _FENCE
    + """
local life = tonumber(ARGV[4])
for i = 3, #KEYS do
  local v = tonumber(ARGV[2 + i])
  local floor = tonumber(redis.call('HGET', KEYS[i], 't'))
  if floor and floor > v then v = floor end
  redis.call('DEL', KEYS[i])
  redis.call('HSET', KEYS[i], 't', string.format('%.0f', v))
  redis.call('PEXPIRE', KEYS[i], life)
end
return redis.call('PUBLISH', ARGV[1], ARGV[3])
"""
)

# Voids every entry and every outstanding ticket.
FLUSH_LUA: Final = (
    _FENCE
    + """
redis.call('INCR', KEYS[1])
return redis.call('PUBLISH', ARGV[1], '*')
"""
)

# ARGV[3] the prober's own channel, ARGV[4] its token: the fence, then the token comes back
# on the subscription, behind every invalidation Redis ran before it (the lease).
PROBE_LUA: Final = (
    _FENCE
    + """
return redis.call('PUBLISH', ARGV[3], ARGV[4])
"""
)

GET: Final = Script(GET_LUA)
PUT: Final = Script(PUT_LUA)
INVALIDATE: Final = Script(INVALIDATE_LUA)
FLUSH: Final = Script(FLUSH_LUA)
PROBE: Final = Script(PROBE_LUA)
