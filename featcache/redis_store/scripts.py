"""The write scripts of the Redis store: every conditional row write, in Lua.

A fill writes only where the key still holds what its reader saw before its SQL read, and only
if the view's epoch did not move; a ``put_rows`` row writes unless a row with a later event
timestamp is there (the timestamp sits at a fixed offset of the value, see
``featcache.codec``). A fenced write whose reader saw the key empty needs none of the general
script's comparisons: ``SET_IF_ABSENT`` is one ``SET ... NX GET`` per row behind the same epoch
check, a fraction of the general script's cost on the server and two arguments a row instead
of five on the client.

Both scripts read the server's clock once and give every row its absolute expiry (``SET ...
PXAT``, the clock plus the row's TTL) rather than its TTL (``PX``): Redis turns each relative
expiry into an absolute one for the command it propagates, and that rewrite, done for every
row, costs about a sixth of the server's CPU per row of a bulk load (docs/benchmarks.md). A
row then expires at most the script's running time (milliseconds) before ``PX`` would make it.
"""

from __future__ import annotations

from featcache.redis_store.base import LuaScript

__all__ = ["CONDITIONAL_SET", "ENSURE_EPOCH", "SET_IF_ABSENT"]

# KEYS[1]: the view's epoch key; KEYS[2..]: row keys of that view, then ARGV[4] lease keys
# (``featcache.leases``) deleted once the rows are written, so waiting readers move on: each
# only where it still holds the writer's token (the last ARGV when there are lease keys); a
# lease that expired and was taken by another reader meanwhile is that reader's.
# ARGV[1]: "1" when the writer read the epoch before its SQL read, and ARGV[2] is what it read
# ("" for none): if the epoch changed since, the whole view was invalidated and nothing is
# written. "2" on a cluster, where the epoch key is in another slot than the rows: ARGV[2] is
# the epoch the writer read, taken as the current one, KEYS[1] is unread (a key of the rows'
# slot holds its place), and a row stamped with an epoch that moved since is written and is a
# miss for every reader (featcache.redis_store.cluster_store).
# ARGV[3]: the write's deadline on the server's clock (microseconds, "0" for none):
# past it nothing is written, since a tombstone laid after the reader's fence may have expired
# (a write held in a stalled server's socket must not land late). Then four ARGV per row key:
# mode, ttl_ms, value, expected. "Ours" means a row ("R" in byte 3, 1-based as Lua counts) of
# the same value layout (bytes 1-2: msgpack array of 8, layout version) as the new value.
#   Both modes: a row never replaces a row of ours with a later event timestamp (bytes 5-12,
#           big-endian int64) if that row is of the view's current epoch. One of an older
#           epoch was invalidated with its whole view (readers miss it): it gives way, or an
#           ETL that moved an event time back and invalidated the view would leave the key a
#           miss until its TTL. Tombstones, negative entries, garbage and keys of other types
#           give way to rows: the key space under the prefix is featcache's.
#   mode F  a fenced fill, also: written only where the key still holds exactly what the
#           reader saw before its SQL read (expected; "" = nothing, or a key of another type,
#           which MGET also shows as nothing). An invalidation, a newer row or another fill in
#           between changed it, so a value read before them is never written (DESIGN 4).
#   mode E  mode F where the reader saw no key (expected ""); normally sent through
#           SET_IF_ABSENT instead.
#   mode R  a row from put_rows without a fence: nothing more.
# Returns how many keys were written.
CONDITIONAL_SET = LuaScript("""
-- an unsigned msgpack int at pos: its value and the position after it, or nil
local function uint_at(s, pos)
  local b = string.byte(s, pos)
  if not b then return nil end
  if b < 128 then return b, pos + 1 end
  if b == 204 then return string.byte(s, pos + 1), pos + 2 end
  if b == 205 then return struct.unpack('>I2', s, pos + 1), pos + 3 end
  if b == 206 then return struct.unpack('>I4', s, pos + 1), pos + 5 end
  if b == 207 then return struct.unpack('>I8', s, pos + 1), pos + 9 end
  return nil
end
-- the epoch of a row (the fingerprint, then the epoch, after the 12 fixed bytes), or nil
local function epoch_of(row)
  local _, after = uint_at(row, 13)
  if not after then return nil end
  return (uint_at(row, after))
end
local current = false  -- the view's epoch, read when first needed
if ARGV[1] == '2' then current = tonumber(ARGV[2]) end
local function of_current_epoch(row)
  if current == false then current = tonumber(redis.call('GET', KEYS[1]) or '') end
  local epoch = epoch_of(row)
  return epoch ~= nil and epoch == current
end
local rows_end = #KEYS - tonumber(ARGV[4])
for i = rows_end + 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[#ARGV] then redis.call('DEL', KEYS[i]) end
end
if ARGV[1] == '1' then
  local epoch = redis.call('GET', KEYS[1]) or ''
  if epoch ~= ARGV[2] then return 0 end
end
local now = redis.call('TIME')
if ARGV[3] ~= '0' and tonumber(now[1]) * 1000000 + tonumber(now[2]) > tonumber(ARGV[3]) then
  return 0
end
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local last_ttl, expires_at = nil, nil
local written = 0
for i = 2, rows_end do
  local base = 4 + 4 * (i - 2)
  local mode, ttl, value = ARGV[base + 1], ARGV[base + 2], ARGV[base + 3]
  local got = redis.pcall('GET', KEYS[i])
  local old = nil
  if type(got) == 'string' then old = got end
  local ok
  local ours = old and string.len(old) >= 12 and string.sub(old, 1, 2) == string.sub(value, 1, 2)
    and string.byte(old, 3) == 82
  ok = (not ours) or string.byte(value, 3) ~= 82
    or struct.unpack('>i8', value, 5) >= struct.unpack('>i8', old, 5)
    or not of_current_epoch(old)
  if ok and mode ~= 'R' then
    ok = (old or '') == ARGV[base + 4]
  end
  if ok then
    if ttl ~= last_ttl then
      last_ttl, expires_at = ttl, string.format('%d', now_ms + tonumber(ttl))
    end
    redis.call('SET', KEYS[i], value, 'PXAT', expires_at)
    written = written + 1
  end
end
return written
""")

# KEYS[1]: the view's epoch key; KEYS[2..]: row keys whose fenced reader saw them empty.
# ARGV[1], ARGV[2], ARGV[3]: the epoch check (mode 2: none) and the deadline of
# CONDITIONAL_SET; ARGV[4]: the
# TTL in ms of every row; ARGV[3 + i]: the value for KEYS[i]. Mode E (F where the reader saw no
# key), for less: the row is written only where the key is still empty (NX). A string there
# now (a tombstone of an invalidation, another fill, a newer row) keeps the row out; a key of
# another type, which MGET showed the reader as nothing, gives way as in CONDITIONAL_SET.
# Each row is one `SET ... NX GET` (Redis >= 7.0): a written row answers nil, which reaches Lua
# as false, where plain NX answers the status OK, which Lua gets as a new table per row; a cold
# bulk load costs the server 8-10% less per row so (docs/benchmarks.md, "What caps one
# process"). A key of another type answers WRONGTYPE to GET, and only that error gives way. A
# server older than 7.0 answers a syntax error to NX beside GET: the reply says what featcache
# needs, which ``redis_store.errors.translate`` makes a configuration error.
# Returns how many keys were written.
SET_IF_ABSENT = LuaScript("""
if ARGV[1] == '1' then
  local epoch = redis.call('GET', KEYS[1]) or ''
  if epoch ~= ARGV[2] then return 0 end
end
local now = redis.call('TIME')
if ARGV[3] ~= '0' and tonumber(now[1]) * 1000000 + tonumber(now[2]) > tonumber(ARGV[3]) then
  return 0
end
local expires_at = string.format('%d', tonumber(now[1]) * 1000
  + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[4]))
local written = 0
for i = 2, #KEYS do
  local held = redis.pcall('SET', KEYS[i], ARGV[i + 3], 'PXAT', expires_at, 'NX', 'GET')
  if not held then
    written = written + 1
  elseif type(held) == 'table' and held.err then
    if string.find(held.err, 'syntax error', 1, true) then
      return redis.error_reply('ERR featcache needs Redis >= 7.0 or Valkey: this server ' ..
        'refused SET ... NX GET (' .. held.err .. ')')
    end
    if string.sub(held.err, 1, 9) ~= 'WRONGTYPE' then return redis.error_reply(held.err) end
    redis.call('SET', KEYS[i], ARGV[i + 3], 'PXAT', expires_at)
    written = written + 1
  end
end
return written
""")

# KEYS[1]: a view's epoch key. The epoch, created from the server clock if it is missing, so
# that no row is ever stamped with an epoch a lost key could come back to (0).
ENSURE_EPOCH = LuaScript("""
local epoch = redis.call('GET', KEYS[1])
if epoch then return epoch end
local t = redis.call('TIME')
redis.call('SET', KEYS[1], string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2])), 'NX')
return redis.call('GET', KEYS[1])
""")
