# The target group always exists (with create_alb = false, attach it to an existing listener).
# Its health check is GET /healthz: liveness only, so a watcher waiting for MongoDB stays a
# healthy target for the operators' control requests (see the README's "Which probe where").
resource "aws_lb_target_group" "this" {
  name_prefix          = "mw-"
  port                 = local.http_port
  protocol             = "HTTP"
  target_type          = "ip"
  vpc_id               = var.vpc_id
  deregistration_delay = 30

  health_check {
    enabled             = true
    path                = "/healthz"
    port                = "traffic-port"
    protocol            = "HTTP"
    matcher             = "200"
    interval            = 15
    timeout             = 5
    healthy_threshold   = 2
    unhealthy_threshold = 3
  }

  tags = merge(local.tags, { Name = var.name })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_lb" "this" {
  count = var.create_alb ? 1 : 0

  name                       = var.name
  internal                   = true
  load_balancer_type         = "application"
  subnets                    = length(var.alb_subnet_ids) > 0 ? var.alb_subnet_ids : var.subnet_ids
  security_groups            = [aws_security_group.alb[0].id]
  drop_invalid_header_fields = true
  enable_deletion_protection = var.alb_deletion_protection

  dynamic "access_logs" {
    for_each = var.alb_access_logs_bucket == null ? [] : [var.alb_access_logs_bucket]

    content {
      bucket  = access_logs.value
      prefix  = var.name
      enabled = true
    }
  }

  tags = local.tags
}

resource "aws_lb_listener" "https" {
  count = var.create_alb ? 1 : 0

  load_balancer_arn = aws_lb.this[0].arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = var.alb_ssl_policy
  certificate_arn   = var.alb_certificate_arn

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.this.arn
  }

  tags = local.tags

  lifecycle {
    precondition {
      condition     = var.alb_certificate_arn != null
      error_message = "Set alb_certificate_arn (ACM certificate of the HTTPS listener) when create_alb = true."
    }
  }
}
