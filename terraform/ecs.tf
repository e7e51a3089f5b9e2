# ECS has no ConfigMap and the binary reads its config from a file, so a tiny init container
# writes config_yaml (passed in an environment variable) to a task-scoped ephemeral volume and
# exits; mongo-watcher starts only after it succeeded and mounts the volume read-only.

locals {
  config_dir  = "/etc/mongo-watcher"
  config_file = "/etc/mongo-watcher/config.yaml"

  log_configuration = {
    logDriver = "awslogs"
    options = {
      awslogs-group         = aws_cloudwatch_log_group.this.name
      awslogs-region        = local.region
      awslogs-stream-prefix = "ecs"
    }
  }

  config_init_container = {
    name      = "config-init"
    image     = var.init_image
    essential = false
    # Root, with every capability dropped, owns the fresh volume; nothing else runs here.
    user                   = "0"
    readonlyRootFilesystem = true
    entryPoint             = ["sh", "-c"]
    # The file 0644 and its folder a+rx, so the non-root mongo-watcher container can read it.
    command = ["set -e; umask 022; printf '%s\\n' \"$MONGO_WATCHER_CONFIG_YAML\" > /etc/mongo-watcher/config.yaml; chmod a+rx /etc/mongo-watcher 2>/dev/null || true"]
    environment = [
      { name = "MONGO_WATCHER_CONFIG_YAML", value = var.config_yaml },
    ]
    mountPoints = [
      { sourceVolume = "config", containerPath = local.config_dir, readOnly = false },
    ]
    linuxParameters  = { capabilities = { drop = ["ALL"] } }
    logConfiguration = local.log_configuration
  }

  mongo_watcher_container = {
    name      = "mongo-watcher"
    image     = var.image
    essential = true
    user      = "65532:65532"
    command   = ["run", "--config", local.config_file]
    dependsOn = [
      { containerName = "config-init", condition = "SUCCESS" },
    ]
    portMappings = [
      { name = "http", containerPort = local.http_port, protocol = "tcp" },
    ]
    environment = concat(
      [
        { name = "MONGO_WATCHER_CONFIG", value = local.config_file },
        { name = "AWS_REGION", value = local.region },
      ],
      [for name, value in var.environment : { name = name, value = value }],
    )
    secrets = [for name, arn in var.secret_environment : { name = name, valueFrom = arn }]
    mountPoints = [
      { sourceVolume = "config", containerPath = local.config_dir, readOnly = true },
    ]
    readonlyRootFilesystem = true
    linuxParameters        = { capabilities = { drop = ["ALL"] } }
    # SIGTERM: stop reading, flush, final checkpoint, exit 0 within 20 s; SIGKILL after 30 s.
    stopTimeout = 30
    # The distroless image has no shell or curl: the binary probes its own GET /healthz on
    # 127.0.0.1:8080 (http_port) and exits 0 on 200. Liveness only, like the ALB's check; the
    # start period covers reading SSM secrets before the control plane listens.
    healthCheck = {
      command     = ["CMD", "/usr/local/bin/mongo-watcher", "healthcheck"]
      interval    = 30
      timeout     = 5
      retries     = 3
      startPeriod = 60
    }
    logConfiguration = local.log_configuration
  }

  container_definitions = [local.config_init_container, local.mongo_watcher_container]
}

resource "aws_ecs_task_definition" "this" {
  family                   = var.name
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.cpu
  memory                   = var.memory
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.task.arn
  container_definitions    = jsonencode(local.container_definitions)

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = var.cpu_architecture
  }

  # Fargate task storage shared by the two containers, gone with the task.
  volume {
    name = "config"
  }

  tags = local.tags
}

resource "aws_ecs_service" "this" {
  name                   = var.name
  cluster                = var.ecs_cluster_arn
  task_definition        = aws_ecs_task_definition.this.arn
  launch_type            = "FARGATE"
  platform_version       = var.platform_version
  enable_execute_command = false
  propagate_tags         = "SERVICE"

  # Without leases one task, never two at once: watchers are not sharded, and a second task
  # would run the same watchers against the same checkpoints. A deployment therefore stops the
  # old task (SIGTERM: it flushes and writes its final checkpoint) before starting the new one:
  # minimum 0 % healthy, maximum 100 %. Delivery pauses for the restart, nothing is lost.
  # With leases the deployment is rolling (minimum 100 %, maximum 200 %): new tasks start
  # before old ones stop, and a stopping task drains, writes its final checkpoints and releases
  # its leases, which the others take at their next tick.
  desired_count                      = var.desired_count
  deployment_minimum_healthy_percent = var.leases_enabled ? 100 : 0
  deployment_maximum_percent         = var.leases_enabled ? 200 : 100

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  # Time to connect before the ALB's /healthz checks count.
  health_check_grace_period_seconds = 60

  network_configuration {
    subnets          = var.subnet_ids
    security_groups  = [aws_security_group.task.id]
    assign_public_ip = false
  }

  load_balancer {
    target_group_arn = aws_lb_target_group.this.arn
    container_name   = "mongo-watcher"
    container_port   = local.http_port
  }

  tags = local.tags

  depends_on = [aws_lb_listener.https]
}
