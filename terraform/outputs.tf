output "service_name" {
  description = "ECS service name."
  value       = aws_ecs_service.this.name
}

output "task_definition_arn" {
  description = "Task definition revision deployed."
  value       = aws_ecs_task_definition.this.arn
}

output "checkpoint_table_name" {
  description = "DynamoDB checkpoint table (the config's checkpoints.table)."
  value       = aws_dynamodb_table.checkpoints.name
}

output "checkpoint_table_arn" {
  description = "DynamoDB checkpoint table ARN."
  value       = aws_dynamodb_table.checkpoints.arn
}

output "lease_table_name" {
  description = "DynamoDB lease table (the config's leases.table); null without leases_enabled."
  value       = var.leases_enabled ? aws_dynamodb_table.leases[0].name : null
}

output "lease_table_arn" {
  description = "DynamoDB lease table ARN; null without leases_enabled."
  value       = var.leases_enabled ? aws_dynamodb_table.leases[0].arn : null
}

output "task_role_arn" {
  description = "IAM role of the mongo-watcher process."
  value       = aws_iam_role.task.arn
}

output "execution_role_arn" {
  description = "ECS task execution role."
  value       = aws_iam_role.execution.arn
}

output "task_security_group_id" {
  description = "Security group of the tasks (allow it on MongoDB's security group)."
  value       = aws_security_group.task.id
}

output "target_group_arn" {
  description = "Target group of the control plane (health check GET /healthz)."
  value       = aws_lb_target_group.this.arn
}

output "alb_dns_name" {
  description = "DNS name of the internal ALB (null without create_alb)."
  value       = var.create_alb ? aws_lb.this[0].dns_name : null
}

output "log_group_name" {
  description = "CloudWatch log group of both containers."
  value       = aws_cloudwatch_log_group.this.name
}
