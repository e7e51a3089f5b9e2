locals {
  # The ALB whose security group may reach the tasks: the one created here or an existing one.
  alb_security_group_id = var.create_alb ? aws_security_group.alb[0].id : var.alb_security_group_id
}

# --- Tasks -------------------------------------------------------------------------------------

resource "aws_security_group" "task" {
  name_prefix = "${var.name}-task-"
  description = "mongo-watcher tasks: port 8080 from the ALB only; out to MongoDB and HTTPS"
  vpc_id      = var.vpc_id

  tags = merge(local.tags, { Name = "${var.name}-task" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "task_from_alb" {
  security_group_id            = aws_security_group.task.id
  description                  = "Control plane and health checks from the ALB"
  ip_protocol                  = "tcp"
  from_port                    = local.http_port
  to_port                      = local.http_port
  referenced_security_group_id = local.alb_security_group_id

  lifecycle {
    precondition {
      condition     = var.create_alb || var.alb_security_group_id != null
      error_message = "Set alb_security_group_id (the existing ALB's security group) when create_alb = false."
    }
  }
}

resource "aws_vpc_security_group_egress_rule" "task_https" {
  security_group_id = aws_security_group.task.id
  description       = "AWS APIs (Kinesis, DynamoDB, SSM, CloudWatch Logs, ECR) over HTTPS"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_vpc_security_group_egress_rule" "task_mongodb" {
  for_each = toset(var.mongodb_cidr_blocks)

  security_group_id = aws_security_group.task.id
  description       = "MongoDB"
  ip_protocol       = "tcp"
  from_port         = var.mongodb_port
  to_port           = var.mongodb_port
  cidr_ipv4         = each.value
}

# --- ALB ---------------------------------------------------------------------------------------

resource "aws_security_group" "alb" {
  count = var.create_alb ? 1 : 0

  name_prefix = "${var.name}-alb-"
  description = "mongo-watcher internal ALB: HTTPS in from alb_ingress_cidr_blocks, 8080 out to the tasks"
  vpc_id      = var.vpc_id

  tags = merge(local.tags, { Name = "${var.name}-alb" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "alb_https" {
  for_each = var.create_alb ? toset(var.alb_ingress_cidr_blocks) : toset([])

  security_group_id = aws_security_group.alb[0].id
  description       = "HTTPS to the control plane"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "alb_to_task" {
  count = var.create_alb ? 1 : 0

  security_group_id            = aws_security_group.alb[0].id
  description                  = "To the mongo-watcher tasks"
  ip_protocol                  = "tcp"
  from_port                    = local.http_port
  to_port                      = local.http_port
  referenced_security_group_id = aws_security_group.task.id
}
