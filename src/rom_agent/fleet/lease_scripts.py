"""The Lua scripts of fleet-wide admission (`fleet/leases.py` describes the keys).

KEYS: running (lease → expiry ms), queue (lease → arrival number), qexp (queued lease →
expiry ms), seq. Every script first sweeps expired leases and promotes queue heads into free
slots, PUBLISHing the promoted ids on the fleet channel.
"""

from __future__ import annotations

_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function sweep()
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
  for _, id in ipairs(dead) do redis.call('ZREM', KEYS[2], id) end
  if #dead > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now) end
end
local function promote(ttl, limit, channel)
  local promoted = {}
  while redis.call('ZCARD', KEYS[1]) < limit do
    local head = redis.call('ZRANGE', KEYS[2], 0, 0)
    if #head == 0 then break end
    local id = head[1]
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZREM', KEYS[3], id)
    redis.call('ZADD', KEYS[1], now + ttl, id)
    promoted[#promoted + 1] = id
  end
  if #promoted > 0 then
    redis.call('PUBLISH', channel, cjson.encode({kind = 'admission', promoted = promoted}))
  end
end
"""

# ARGV: ttl_ms, limit, max_queue, channel, id, deadline_ms
#   → {1 admitted | 0 queued | -1 full | -2 too late, running, queued}
# A call that arrives after its deadline (Redis's clock; 0 = none) changes nothing: its caller
# has given up and admitted the request locally (Redis runs what was buffered during a stall).
ACQUIRE = (
    _COMMON
    + """
local ttl, limit, max_queue = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local deadline = tonumber(ARGV[6])
if deadline > 0 and now > deadline then return {-2, 0, 0} end
sweep()
promote(ttl, limit, ARGV[4])
local running = redis.call('ZCARD', KEYS[1])
local queued = redis.call('ZCARD', KEYS[2])
if queued == 0 and running < limit then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[5])
  return {1, running + 1, queued}
end
if queued < max_queue then
  local seq = redis.call('INCR', KEYS[4])
  redis.call('ZADD', KEYS[2], seq, ARGV[5])
  redis.call('ZADD', KEYS[3], now + ttl, ARGV[5])
  return {0, running, queued + 1}
end
return {-1, running, queued}
"""
)

# ARGV: ttl_ms, limit, channel, id... → removes the leases (running or queued), promotes.
RELEASE = (
    _COMMON
    + """
for i = 4, #ARGV do
  redis.call('ZREM', KEYS[1], ARGV[i])
  redis.call('ZREM', KEYS[2], ARGV[i])
  redis.call('ZREM', KEYS[3], ARGV[i])
end
sweep()
promote(tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3])
return {redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2])}
"""
)

# ARGV: ttl_ms, limit, channel, id... → for each id 'r' running, 'q' queued or 'x' gone.
RENEW = (
    _COMMON
    + """
local ttl = tonumber(ARGV[1])
sweep()
promote(ttl, tonumber(ARGV[2]), ARGV[3])
local states = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  if redis.call('ZSCORE', KEYS[1], id) then
    redis.call('ZADD', KEYS[1], now + ttl, id)
    states[#states + 1] = 'r'
  elseif redis.call('ZSCORE', KEYS[2], id) then
    redis.call('ZADD', KEYS[3], now + ttl, id)
    states[#states + 1] = 'q'
  else
    states[#states + 1] = 'x'
  end
end
return states
"""
)
