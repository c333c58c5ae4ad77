-- wrk script of bench/orgs.py (python -m bench orgs): the same GET with many bearer tokens, one token after another.
--
--   wrk -t1 -c64 -d10s --latency -s bench/orgs.lua URL -- TOKENS_FILE TARGETS [T0 [status]]
--
-- TOKENS_FILE holds one token per line; TARGETS is a comma-separated list of request targets
-- ("/v1/images?idc=X&product=Y,..."). Every (token, target) request is formatted once, in init(); request()
-- only hands out the next one, so the per-request cost in wrk is one table lookup. Over a full cycle every
-- token is sent with every target.
--
-- With T0 (wall-clock epoch seconds, e.g. the server's readiness), request() also counts the requests
-- sent in each second since T0. On a keep-alive connection wrk sends the next request when the previous
-- answer is complete, so this is the throughput per second (shifted by one latency), at the cost of one
-- clock read per request. With "status", a response() hook also counts the answers whose status is not
-- 200: defining response() makes wrk copy every header and body into Lua, which costs wrk throughput,
-- so without "status" it is not defined at all. done() prints the counts as "orgs-lua ..." lines after
-- wrk's own summary.

prepared = {}
counter = 0
buckets = {}
statuses = {}
clock = "none"

local threads = {}
local size = 0
local t0 = 0
local now = nil

function setup(thread)
   table.insert(threads, thread)
end

local function now_function()
   local ok, ffi = pcall(require, "ffi")
   if ok then
      ffi.cdef [[
         typedef struct { long tv_sec; long tv_nsec; } orgs_timespec;
         int clock_gettime(int clock_id, orgs_timespec *tp);
      ]]
      local ts = ffi.new("orgs_timespec")
      clock = "clock_gettime"
      return function()
         ffi.C.clock_gettime(0, ts) -- CLOCK_REALTIME, the clock of Python's time.time()
         return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
      end
   end
   clock = "os.time"
   return os.time
end

function init(args)
   local tokens = {}
   for line in io.lines(args[1]) do
      if #line > 0 then
         tokens[#tokens + 1] = line
      end
   end
   local targets = {}
   for target in string.gmatch(args[2], "[^,]+") do
      targets[#targets + 1] = target
   end
   if #tokens == 0 or #targets == 0 then
      error("orgs.lua: no tokens or no targets")
   end
   for k = 0, #tokens * #targets - 1 do
      local token = tokens[(k % #tokens) + 1]
      local target = targets[(math.floor(k / #tokens) % #targets) + 1]
      prepared[#prepared + 1] = wrk.format("GET", target, { Authorization = "Bearer " .. token })
   end
   size = #prepared

   if args[3] then
      t0 = tonumber(args[3])
      now = now_function()
   end
   if args[4] == "status" then
      response = function(status, headers, body)
         if status ~= 200 then
            statuses[status] = (statuses[status] or 0) + 1
         end
      end
   end
end

function request()
   counter = counter % size + 1
   if now then
      local bucket = math.floor(now() - t0)
      buckets[bucket] = (buckets[bucket] or 0) + 1
   end
   return prepared[counter]
end

function done(summary, latency, requests)
   for _, thread in ipairs(threads) do
      local counted = thread:get("buckets")
      local by_status = thread:get("statuses")
      io.write(string.format("orgs-lua clock %s\n", thread:get("clock")))
      for bucket, count in pairs(counted) do
         io.write(string.format("orgs-lua bucket %d %d\n", bucket, count))
      end
      for status, count in pairs(by_status) do
         io.write(string.format("orgs-lua status %d %d\n", status, count))
      end
   end
end
