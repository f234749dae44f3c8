-- Argo CD health check for dbpolicy.dev/DatabasePolicy (Lua 5.1, as Argo CD runs it).
-- Install: docs/argocd.md (argocd-cm key resource.customizations.health.dbpolicy.dev_DatabasePolicy).
--
--   Suspended    spec.suspend is true
--   Progressing  no status yet, status.observedGeneration behind metadata.generation, no
--                Ready condition yet, Ready Unknown, or Ready for an older generation
--   Healthy      Ready True
--   Suspended    also: Ready False with reason PlanPending (spec.mode Plan: the plan waits
--                for a person to read it and switch to Apply) or Suspended
--   Degraded     Ready False for any other reason (it says why: ConnectionFailed,
--                LockTimeout, DestructiveChangesRefused, ...)
local hs = {}

if obj.spec ~= nil and obj.spec.suspend == true then
  hs.status = "Suspended"
  hs.message = "Reconciliation is suspended (spec.suspend: true)"
  return hs
end

local status = obj.status
if status == nil or status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile the policy"
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile generation " .. generation ..
    " (observed " .. status.observedGeneration .. ")"
  return hs
end

local ready = nil
if status.conditions ~= nil then
  for _, c in ipairs(status.conditions) do
    if c.type == "Ready" then
      ready = c
    end
  end
end

if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end

if ready.observedGeneration ~= nil and generation ~= nil and ready.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition of generation " .. generation
  return hs
end

local function describe(c)
  local m = c.reason or ""
  if c.message ~= nil and c.message ~= "" then
    if m ~= "" then
      m = m .. ": "
    end
    m = m .. c.message
  end
  return m
end

if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready)
  return hs
end

if ready.status == "False" and (ready.reason == "PlanPending" or ready.reason == "Suspended") then
  hs.status = "Suspended"
  hs.message = describe(ready)
  return hs
end

if ready.status == "False" then
  hs.status = "Degraded"
  hs.message = describe(ready)
  return hs
end

hs.status = "Progressing"
hs.message = describe(ready)
if hs.message == "" then
  hs.message = "Waiting for the operator to reconcile the policy"
end
return hs
