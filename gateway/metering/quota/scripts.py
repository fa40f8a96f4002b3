"""The Lua scripts of admission, settlement and lease renewal: each atomic over every key it names."""

# Counter hashes hold settled amounts (s_usd, s_tok, s_req) and one field r = "usd:tok:req" reserved.
# Leases are per tenant: a sorted set of request ids by expiry, a hash from request id to what it reserved
# where ("key,usd,tok,req;key,usd,tok,req"), and a hash of each request's ledger fields. Settling a lease
# gives the reservation back; a lease that runs out is counted at its reservation (expire_leases). Until
# its ledger row is on disk a request stays in the orphans hash, which the sweeper turns into ledger rows
# when a gateway dies holding them (tollway.gateway.metering.sweeper).
_LEASE_LIB = """
local function triple(s)
  if not s then return 0, 0, 0 end
  local a, b, c = string.match(s, '(%d+):(%d+):(%d+)')
  return tonumber(a), tonumber(b), tonumber(c)
end
local function release(rec, spent)
  for key, u, t, r in string.gmatch(rec, '([^,;]+),(%d+),(%d+),(%d+)') do
    local cur = redis.call('HGET', key, 'r')
    if cur then
      local a, b, c = triple(cur)
      redis.call('HSET', key, 'r', string.format('%d:%d:%d', math.max(0, a - tonumber(u)),
        math.max(0, b - tonumber(t)), math.max(0, c - tonumber(r))))
      if spent and string.sub(key, -5) ~= ':held' then
        for d, amt in ipairs({tonumber(u), tonumber(t), tonumber(r)}) do
          if amt > 0 then redis.call('HINCRBY', key, ({'s_usd', 's_tok', 's_req'})[d], amt) end
        end
      end
    end
  end
end
-- release(rec, true): the reservation is also counted as spent (a counter whose window has passed is left
-- alone; a hold, whose key ends in ':held', is only released: the velocity's requests in flight, a cap's).
-- A lease that ran out (its gateway died, or could not renew for a whole lease): what it reserved is
-- counted as spent and the request waits in the orphans hash for a ledger row at that amount, marked
-- unsettled.
-- KEYS of the lease set: leases zset, lease hash, meta hash, orphans hash (as lease_keys names them).
local function expire_leases(now, kz, kh, km, ko)
  local expired = redis.call('ZRANGEBYSCORE', kz, '-inf', now)
  if #expired == 0 then return 0 end
  for _, id in ipairs(expired) do
    local rec = redis.call('HGET', kh, id)
    if rec then
      release(rec, true)
      local m = redis.call('HGET', km, id)
      if m then
        redis.call('HSET', ko, id, 'r|' .. now .. '|' .. m)
        redis.call('PEXPIRE', ko, 86400000)
      end
    end
    redis.call('HDEL', kh, id)
    redis.call('HDEL', km, id)
  end
  redis.call('ZREMRANGEBYSCORE', kz, '-inf', now)
  return #expired
end
"""

# KEYS: storm, the lease set (leases zset, lease hash, meta hash, orphans hash, gone zset), one counter hash
#       per counter, then (only when velocity is watched) velocity-over, the velocity buckets, newest first,
#       x6, and velocity-held
# ARGV: now_ms, lease_ms, rid, storm_limit, storm_window_s, velocity (-2: not watched, -1: read only,
#       >= 0: the hard line in nano-USD/min), n, then per counter:
#       lim_usd, lim_tok, lim_req, amt_usd, amt_tok, amt_req, ttl_s; then this request's worst-case USD;
#       then the request's ledger fields as JSON (kept with its lease: a dead gateway's row is written from it)
# Under a hard line, the worst case of every request in flight (velocity-held, a lease like any other
# reservation) counts toward the velocity: the ceiling holds to within one request's cost.
RESERVE = _LEASE_LIB + """
local now = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local rid = ARGV[3]
local storm_limit = tonumber(ARGV[4])
local vel_hard = tonumber(ARGV[6])
local n = tonumber(ARGV[7])
local C = 7  -- the first counter's key
if storm_limit > 0 then
  local seen = redis.call('HINCRBY', KEYS[1], 'n', 1)
  if seen == 1 then
    redis.call('HSET', KEYS[1], 'first', now)
    redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
  end
  if seen > storm_limit then
    return {2, redis.call('PTTL', KEYS[1]), tonumber(redis.call('HGET', KEYS[1], 'first')), seen}
  end
end
local held_key = nil
if vel_hard >= 0 then held_key = KEYS[C + n + 7] end
if n == 0 and not held_key then
  if vel_hard == -1 then
    local velocity = 0
    for b = C + 1, C + 6 do velocity = velocity + (tonumber(redis.call('GET', KEYS[b])) or 0) end
    return {1, velocity}
  end
  return {1, 0}
end
expire_leases(now, KEYS[2], KEYS[3], KEYS[4], KEYS[5])
local velocity = 0
if vel_hard >= -1 then
  local over = C + n
  for b = over + 1, over + 6 do velocity = velocity + (tonumber(redis.call('GET', KEYS[b])) or 0) end
  if held_key then
    local in_flight = triple(redis.call('HGET', held_key, 'r'))
    if velocity + in_flight > vel_hard then
      local since = tonumber(redis.call('GET', KEYS[over])) or now
      local first = redis.call('SET', KEYS[over] .. ':refused', 1, 'NX', 'EX', 60) and 1 or 0
      return {3, velocity + in_flight, since, first}
    end
  end
end
local used = {}
local fresh = {}
local held = {}
for i = 0, n - 1 do
  local v = redis.call('HMGET', KEYS[C + i], 's_usd', 's_tok', 's_req', 'r')
  fresh[i] = not (v[1] or v[2] or v[3] or v[4])
  local ru, rt, rr = triple(v[4])
  local reserved = {ru, rt, rr}
  held[i] = reserved
  for d = 1, 3 do
    local lim = tonumber(ARGV[7 + 7 * i + d])
    local amt = tonumber(ARGV[10 + 7 * i + d])
    local u = (tonumber(v[d]) or 0) + reserved[d]
    if lim >= 0 and u + amt > lim then
      return {0, i, d - 1, u, lim}
    end
    used[3 * i + d] = u
  end
end
local rec = {}
local out = {1, velocity}
for i = 0, n - 1 do
  local base = 7 + 7 * i
  local key = KEYS[C + i]
  local u, t, r = tonumber(ARGV[base + 4]), tonumber(ARGV[base + 5]), tonumber(ARGV[base + 6])
  local a, b, c = held[i][1], held[i][2], held[i][3]
  redis.call('HSET', key, 'r', string.format('%d:%d:%d', a + u, b + t, c + r))
  local ttl = tonumber(ARGV[base + 7])
  if fresh[i] and ttl > 0 then redis.call('EXPIRE', key, ttl) end
  rec[#rec + 1] = string.format('%s,%d,%d,%d', key, u, t, r)
  out[#out + 1] = used[3 * i + 1] + u
  out[#out + 1] = used[3 * i + 2] + t
  out[#out + 1] = used[3 * i + 3] + r
end
if held_key then
  local worst = tonumber(ARGV[8 + 7 * n])
  local a = triple(redis.call('HGET', held_key, 'r'))
  redis.call('HSET', held_key, 'r', string.format('%d:0:0', a + worst))
  redis.call('PEXPIRE', held_key, lease * 4)
  rec[#rec + 1] = string.format('%s,%d,0,0', held_key, worst)
end
redis.call('ZADD', KEYS[2], now + lease, rid)
redis.call('HSET', KEYS[3], rid, table.concat(rec, ';'))
redis.call('HSET', KEYS[4], rid, ARGV[9 + 7 * n])
for k = 2, 4 do redis.call('PEXPIRE', KEYS[k], lease * 4) end
return out
"""

# KEYS: the lease set (leases zset, lease hash, meta hash, orphans hash, gone zset), one counter hash per
#       counter, then (only when velocity is watched) velocity-over and the velocity buckets, newest first, x6
# ARGV: rid, now_ms, velocity (as in RESERVE), n, then per counter: usd, tok, req, ttl_s; then spent usd
#       and tokens
# A settled request waits in the orphans hash ('s') until its gateway has its ledger row on disk (ACK);
# were the gateway to die first, the sweeper writes the row from there. A request whose lease ran out
# before it settled was counted at its reservation then (expire_leases): settling it adds nothing more.
SETTLE = _LEASE_LIB + """
local rid = ARGV[1]
local n = tonumber(ARGV[4])
local C = 6  -- the first counter's key
local rec = redis.call('HGET', KEYS[2], rid)
if rec then
  release(rec)
  redis.call('HDEL', KEYS[2], rid)
  redis.call('ZREM', KEYS[1], rid)
  local m = redis.call('HGET', KEYS[3], rid)
  if m then
    redis.call('HDEL', KEYS[3], rid)
    redis.call('HSET', KEYS[4], rid, string.format('s|%s|%s|%s|', ARGV[2], ARGV[5 + 4 * n], ARGV[6 + 4 * n]) .. m)
    redis.call('PEXPIRE', KEYS[4], 86400000)
  end
elseif redis.call('ZSCORE', KEYS[5], rid) or redis.call('HEXISTS', KEYS[4], rid) == 1 then
  return 0
end
for i = 0, n - 1 do
  local key = KEYS[C + i]
  local base = 4 + 4 * i
  for d, field in ipairs({'s_usd', 's_tok', 's_req'}) do
    local amt = tonumber(ARGV[base + d])
    if amt > 0 then redis.call('HINCRBY', key, field, amt) end
  end
  local ttl = tonumber(ARGV[base + 4])
  if ttl > 0 and redis.call('TTL', key) == -1 then redis.call('EXPIRE', key, ttl) end
end
local vel_hard = tonumber(ARGV[3])
local spent = tonumber(ARGV[5 + 4 * n]) or 0
local over = C + n
if vel_hard >= -1 and spent > 0 then
  redis.call('INCRBY', KEYS[over + 1], spent)
  redis.call('EXPIRE', KEYS[over + 1], 90)
end
if vel_hard >= 0 then
  local velocity = 0
  for b = over + 1, over + 6 do velocity = velocity + (tonumber(redis.call('GET', KEYS[b])) or 0) end
  if velocity > vel_hard then redis.call('SET', KEYS[over], ARGV[2], 'NX', 'EX', 120) end
end
return 1
"""

# The gateway's ledger rows are on disk (PostgreSQL or its spill file): their settled requests leave the
# orphans hash. KEYS: orphans hash; ARGV: request ids.
ACK = """
for _, rid in ipairs(ARGV) do
  local v = redis.call('HGET', KEYS[1], rid)
  if v and string.sub(v, 1, 1) == 's' then redis.call('HDEL', KEYS[1], rid) end
end
return 1
"""

# The sweeper's look at one tenant: leases that ran out are counted (expire_leases); then every orphan
# that needs a ledger row: each expired reservation ('r'), and each settled request whose row its gateway
# has not confirmed within ARGV[2] ms ('s'). KEYS: the lease set; ARGV: now_ms, grace_ms.
# Each orphan: 'r|expired_ms|meta' or 's|settled_ms|usd_nano|tokens|meta'.
SWEEP = _LEASE_LIB + """
local now = tonumber(ARGV[1])
expire_leases(now, KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - 86400000)
local out = {}
local all = redis.call('HGETALL', KEYS[4])
for i = 1, #all, 2 do
  local v = all[i + 1]
  local kind, at = string.match(v, '^(%a)|(%d+)|')
  if kind == 'r' or (kind == 's' and tonumber(at) + tonumber(ARGV[2]) < now) then
    out[#out + 1] = all[i]
    out[#out + 1] = v
  end
end
return out
"""

# Their ledger rows are written: the orphans leave, remembered (a day) as gone, so that a late settlement
# of an expired lease still adds nothing. KEYS: orphans hash, gone zset; ARGV: now_ms, request ids.
SWEPT = """
for i = 2, #ARGV do
  redis.call('HDEL', KEYS[1], ARGV[i])
  redis.call('ZADD', KEYS[2], tonumber(ARGV[1]), ARGV[i])
end
redis.call('PEXPIRE', KEYS[2], 86400000)
return 1
"""

RENEW = """
return redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[2])
"""
