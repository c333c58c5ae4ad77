-- wrk script of the soak drill (drills/soak.py, drills/wrkload.py): mixed reads over many orgs, paced or not.
--
--   wrk -t1 -c64 -d30s --latency -s drills/soak.lua URL -- PLAN PATTERN T0 WIDTH RATE
--
-- PLAN is a file of "KIND<TAB>TOKEN<TAB>TARGET" lines; KIND is l (list), c (conditional list: If-None-Match
-- with the ETag this script last saw for that line) or g (get by id). PATTERN is a string of kinds, e.g.
-- "lclgl": request() takes the next kind from it, in a cycle, then the next line of that kind, in a cycle.
-- T0 (wall-clock epoch seconds: the drill's start) and WIDTH (seconds) define the windows that answers
-- are counted in, by the time their request was sent. RATE (requests/s, all connections together) paces
-- the load: delay() hands every connection, when it is ready to send, the next slot of one schedule
-- (T0 + k / RATE) and makes it wait for it, so the rate holds whatever the latency, as long as enough
-- connections are free; a connection that finds its slot past sends at once (a backlog is caught up).
-- RATE 0: no pacing (closed loop, as fast as the connections go).
--
-- Every request carries "X-Request-ID: <kind><seq>", which the service echoes: response() finds the
-- request it answers (a ring of send times and plan lines, indexed by seq) and counts, per window, the
-- answers by kind and status and a latency histogram (buckets 5% wide). A conditional request's 200
-- stores its ETag for the next time that line is sent. done() prints "soak-lua ..." lines after wrk's
-- own summary; drills/wrkload.py parses them.

local ffi = require("ffi")
ffi.cdef [[
   typedef struct { long tv_sec; long tv_nsec; } soak_timespec;
   int clock_gettime(int clock_id, soak_timespec *tp);
]]
local ts = ffi.new("soak_timespec")
local function now()
   ffi.C.clock_gettime(0, ts) -- CLOCK_REALTIME: the clock of Python's time.time(), as T0 is
   return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local floor, log, sub = math.floor, math.log, string.sub
local RING = 8192 -- far more than the requests in flight (one per connection)
local BUCKETS_PER_E = 20 -- latency bucket b holds [e^(b/20), e^((b+1)/20)) microseconds: ~5% wide

-- globals: read by done() through thread:get()
-- (flat tables: wrk 4.1's thread:get() loses its way in nested ones, "invalid key to 'next'")
sent = {} -- window -> requests sent
answers = {} -- "window kind status" -> count
histogram = {} -- "window bucket" -> count
unmatched = 0 -- answers without a request id of ours (not echoed)

local threads = {}
local plan = { l = {}, c = {}, g = {} } -- kind -> list of request heads (without the final CRLF)
local next_line = { l = 0, c = 0, g = 0 }
local conditional = {} -- line of kind c -> head with If-None-Match (after its last 200)
local etags = {}
local pattern, position = "", 0
local t0, width, interval, slot = 0, 1, 0, nil
local seq = 0
local sent_at, sent_line = {}, {}

function setup(thread)
   table.insert(threads, thread)
end

local function head(target, headers)
   local request = wrk.format("GET", target, headers)
   return sub(request, 1, -3) -- without the empty line: the request id is appended per request
end

function init(args)
   for line in io.lines(args[1]) do
      local kind, token, target = string.match(line, "^(%a)\t([^\t]+)\t(.+)$")
      if kind and plan[kind] then
         local lines = plan[kind]
         lines[#lines + 1] = { target = target, token = token, head = head(target, { Authorization = "Bearer " .. token }) }
      end
   end
   pattern, t0, width = args[2], tonumber(args[3]), tonumber(args[4])
   local rate = tonumber(args[5])
   for k = 1, #pattern do
      if #plan[sub(pattern, k, k)] == 0 then
         error("soak.lua: the pattern names a kind the plan has no line of")
      end
   end
   if rate > 0 then
      interval = 1 / rate
      delay = function()
         local at = now()
         slot = slot and slot + interval or at
         local wait = slot - at
         return wait > 0 and wait * 1000 or 0
      end
   end
end

local verified = false

function request()
   if not verified then
      -- wrk calls request() once before the run, to count the requests in its answer (pipelining), and
      -- never sends that one: it gets a request that moves no counter and uses no plan line up.
      verified = true
      return plan.l[1].head .. "X-Request-ID: v0\r\n\r\n"
   end
   position = position % #pattern + 1
   local kind = sub(pattern, position, position)
   local lines = plan[kind]
   local index = next_line[kind] % #lines + 1
   next_line[kind] = index
   local request_head = kind == "c" and conditional[index] or lines[index].head
   seq = seq + 1
   local at = now()
   local ring = seq % RING
   sent_at[ring], sent_line[ring] = at, index
   local window = floor((at - t0) / width)
   sent[window] = (sent[window] or 0) + 1
   return request_head .. "X-Request-ID: " .. kind .. seq .. "\r\n\r\n"
end

function response(status, headers, body)
   local id = headers["x-request-id"]
   local number = id and tonumber(sub(id, 2))
   if not number then
      unmatched = unmatched + 1
      return
   end
   local kind, ring = sub(id, 1, 1), number % RING
   local at = sent_at[ring]
   local window = floor((at - t0) / width)
   local key = window .. " " .. kind .. " " .. status
   answers[key] = (answers[key] or 0) + 1
   local micros = (now() - at) * 1e6
   key = window .. " " .. (micros >= 1 and floor(log(micros) * BUCKETS_PER_E) or 0)
   histogram[key] = (histogram[key] or 0) + 1
   if kind == "c" and status == 200 then
      local index, etag = sent_line[ring], headers["etag"]
      if etag and etag ~= etags[index] then
         local line = plan.c[index]
         etags[index] = etag
         conditional[index] = head(line.target, { Authorization = "Bearer " .. line.token, ["If-None-Match"] = etag })
      end
   end
end

function done(summary, latency, requests)
   for _, thread in ipairs(threads) do
      for window, count in pairs(thread:get("sent")) do
         io.write(string.format("soak-lua sent %d %d\n", window, count))
      end
      for key, count in pairs(thread:get("answers")) do
         io.write(string.format("soak-lua answers %s %d\n", key, count))
      end
      for key, count in pairs(thread:get("histogram")) do
         io.write(string.format("soak-lua latency %s %d\n", key, count))
      end
      io.write(string.format("soak-lua unmatched %d\n", thread:get("unmatched")))
   end
end
