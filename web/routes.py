"""The route table: every URL of the API, in one place."""

from __future__ import annotations

from core import accounts, analytics, backups, search, tasks, webhooks
from core import notifications as notif
from web.handlers import accounts as acc
from web.handlers import admin as adm
from web.handlers import analytics as an
from web.handlers import backups as bk
from web.handlers import dashboard as dash
from web.handlers import notifications as nt
from web.handlers import schedules as sch
from web.handlers import ops
from web.handlers import search as sr
from web.handlers import tasks as tk
from web.handlers import webhooks as wh
from web.routing import Route

API = "/api/v1"
AUTH_ERRORS = (401,)
TASK_ETAG = "The task's strong ETag (for If-Match and If-None-Match)"

ROUTES: tuple[Route, ...] = (
    # Auth and account
    Route(
        "POST",
        f"{API}/auth/register",
        acc.register,
        "Create an account",
        "auth",
        auth="none",
        body=accounts.RegisterIn,
        response=accounts.TokenPair,
        status=201,
        errors=(409, 422, 429),
        headers={"Location": "The new account's profile URL"},
        idempotent=True,
    ),
    Route(
        "POST",
        f"{API}/auth/login",
        acc.login,
        "Sign in",
        "auth",
        auth="none",
        body=accounts.LoginIn,
        response=accounts.TokenPair,
        errors=(401, 422, 429),
    ),
    Route(
        "POST",
        f"{API}/auth/refresh",
        acc.refresh,
        "Rotate the refresh token",
        "auth",
        auth="none",
        body=accounts.RefreshIn,
        response=accounts.TokenPair,
        errors=(401, 422, 429),
    ),
    Route(
        "POST",
        f"{API}/auth/logout",
        acc.logout,
        "End this login",
        "auth",
        status=204,
        errors=AUTH_ERRORS,
    ),
    Route(
        "GET",
        f"{API}/me",
        acc.get_me,
        "The caller's profile",
        "account",
        response=accounts.UserPublic,
        errors=AUTH_ERRORS,
    ),
    Route(
        "PATCH",
        f"{API}/me",
        acc.patch_me,
        "Change name or notification preferences",
        "account",
        body=accounts.MePatch,
        response=accounts.UserPublic,
        errors=(401, 422),
    ),
    # Tasks (fixed paths before /tasks/{id})
    Route("POST", f"{API}/tasks", tk.create_task, "Create a task", "tasks",
          body=tasks.TaskCreate, response=tasks.TaskPublic, status=201, errors=(422,),
          headers={"Location": "The new task's URL", "ETag": TASK_ETAG}, idempotent=True),
    Route("GET", f"{API}/tasks", tk.list_tasks, "List tasks", "tasks",
          query=tasks.TaskQuery, response=tasks.TaskPage),
    Route("GET", f"{API}/tasks/stats", tk.task_stats, "Task counts", "tasks",
          response=tasks.Stats, headers={"X-Cache": "hit or miss: whether the cache answered"}),
    Route("POST", f"{API}/tasks/bulk", tk.bulk_tasks, "Change or delete many tasks", "tasks",
          body=tasks.BulkRequest, response=tasks.BulkResponse),
    Route("GET", f"{API}/tasks/{{id}}", tk.get_task, "Get a task", "tasks",
          response=tasks.TaskPublic, errors=(404,), headers={"ETag": TASK_ETAG}),
    Route("PATCH", f"{API}/tasks/{{id}}", tk.patch_task, "Change a task", "tasks",
          body=tasks.TaskUpdate, response=tasks.TaskPublic, errors=(404, 412),
          headers={"ETag": TASK_ETAG}),
    Route("DELETE", f"{API}/tasks/{{id}}", tk.delete_task, "Delete a task", "tasks",
          status=204, errors=(404, 412)),
    Route("GET", f"{API}/tasks/{{id}}/activity", tk.task_activity, "A task's history", "tasks",
          query=tasks.PageQuery, response=tasks.ActivityPage, errors=(404,)),
    # Search
    Route("GET", f"{API}/search", sr.search_tasks, "Search tasks", "tasks",
          query=search.SearchQuery, response=search.SearchResults, errors=(422,)),
    # Notifications (the in-app feed)
    Route("GET", f"{API}/notifications", nt.list_notifications, "The in-app feed, newest first",
          "notifications", query=notif.NotificationQuery, response=notif.NotificationPage,
          errors=(401, 422)),
    Route("POST", f"{API}/notifications/{{id}}/read", nt.read_notification,
          "Mark a notification read (idempotent)", "notifications",
          response=notif.NotificationPublic, errors=(401, 404)),
    # Webhooks
    Route("POST", f"{API}/webhooks", wh.create_webhook, "Register a webhook", "webhooks",
          body=webhooks.WebhookCreate, response=webhooks.WebhookCreated, status=201,
          errors=(409, 422), idempotent=True,
          headers={"Location": "The new webhook's URL",
                   "Cache-Control": "no-store: the answer carries the signing secret"}),
    Route("GET", f"{API}/webhooks", wh.list_webhooks, "List webhooks", "webhooks",
          query=tasks.PageQuery, response=webhooks.WebhookPage),
    Route("GET", f"{API}/webhooks/{{id}}", wh.get_webhook, "Get a webhook", "webhooks",
          response=webhooks.WebhookPublic, errors=(404,)),
    Route("DELETE", f"{API}/webhooks/{{id}}", wh.delete_webhook, "Delete a webhook",
          "webhooks", status=204, errors=(404,)),
    Route("GET", f"{API}/webhooks/{{id}}/deliveries", wh.list_webhook_deliveries,
          "A webhook's delivery log", "webhooks", query=tasks.PageQuery,
          response=webhooks.DeliveryPage, errors=(404,)),
    Route("POST", f"{API}/webhooks/{{id}}/deliveries/{{delivery_id}}/redeliver",
          wh.redeliver_webhook_delivery, "Send a delivery again", "webhooks",
          response=webhooks.DeliveryPublic, status=202, errors=(404,)),
    # Analytics (from the hourly rollups)
    Route("GET", f"{API}/analytics/summary", an.analytics_summary,
          "Tasks created and completed per day, median time to complete", "analytics",
          query=analytics.SummaryQuery, response=analytics.AnalyticsSummary, errors=(422,)),
    # Operators: queues, dead letters, workers
    Route("GET", f"{API}/admin/queues", adm.list_queues, "Queue depths and latency", "admin",
          auth="admin", response=adm.QueueList, errors=(401, 403, 503)),
    Route("GET", f"{API}/admin/queues/{{queue}}/dead", adm.list_dead,
          "A queue's dead letters", "admin", auth="admin", query=adm.DeadQuery,
          response=adm.DeadList, errors=(401, 403, 404, 503)),
    Route("POST", f"{API}/admin/queues/{{queue}}/dead/retry", adm.retry_dead,
          "Replay dead letters (all, or ids)", "admin", auth="admin", body=adm.RetryIn,
          response=adm.RetryOut, errors=(401, 403, 404, 422, 503)),
    Route("DELETE", f"{API}/admin/queues/{{queue}}/dead", adm.purge_dead,
          "Purge a queue's dead letters", "admin", auth="admin", response=adm.PurgeOut,
          errors=(401, 403, 404, 503)),
    Route("GET", f"{API}/admin/workers", adm.list_workers, "Live workers", "admin",
          auth="admin", response=adm.WorkerList, errors=(401, 403, 503)),
    Route("GET", f"{API}/admin/schedules", sch.list_schedules, "The schedule", "admin",
          auth="admin", response=sch.ScheduleList),
    Route("POST", f"{API}/admin/schedules/{{name}}/run", sch.run_schedule,
          "Fire a scheduled job now", "admin", auth="admin", response=sch.RunStarted,
          status=202, errors=(404,)),
    # Operators: backups (taken by a worker; followed at the Location)
    Route("GET", f"{API}/admin/backups", bk.list_backups, "Backups, newest first", "admin",
          auth="admin", query=tasks.PageQuery, response=backups.BackupPage),
    Route("POST", f"{API}/admin/backups", bk.start_backup, "Start a full backup", "admin",
          auth="admin", response=backups.BackupPublic, status=202, errors=(409, 503),
          headers={"Location": "The backup's URL: poll it until succeeded or failed"},
          idempotent=True),
    Route("GET", f"{API}/admin/backups/{{id}}", bk.get_backup, "One backup", "admin",
          auth="admin", response=backups.BackupPublic, errors=(404,)),
    # Operations
    Route(
        "GET",
        "/healthz",
        ops.healthz,
        "Liveness",
        "operations",
        auth="none",
        response=ops.Health,
        rate_limited=False,
    ),
    Route(
        "GET",
        "/readyz",
        ops.readyz,
        "Readiness (MongoDB and Redis)",
        "operations",
        auth="none",
        response=ops.Health,
        errors=(503,),
        rate_limited=False,
    ),
    Route(
        "GET",
        "/metrics",
        ops.metrics,
        "Prometheus metrics",
        "operations",
        auth="none",
        content_type="text/plain",
        rate_limited=False,
    ),
    Route(
        "GET",
        f"{API}/openapi.json",
        ops.openapi,
        "This document",
        "operations",
        auth="none",
        rate_limited=False,
    ),
    Route(
        "GET",
        "/docs",
        ops.docs,
        "Interactive API documentation",
        "operations",
        auth="none",
        content_type="text/html",
        rate_limited=False,
    ),
    # The page is public; every call its script makes needs an admin token.
    Route("GET", "/admin", dash.dashboard, "The operator dashboard page", "admin",
          auth="none", content_type="text/html", rate_limited=False),
)
