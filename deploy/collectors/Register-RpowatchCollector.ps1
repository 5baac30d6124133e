<#
.SYNOPSIS
    Runs Publish-RpowatchTelemetry.ps1 every minute on this node, as SYSTEM, with a scheduled task.

.EXAMPLE
    .\Register-RpowatchCollector.ps1 -ScriptPath C:\rpowatch\Publish-RpowatchTelemetry.ps1 `
        -Arguments '-Broker mqtt.contoso.com -Port 8883 -CaFile C:\rpowatch\ca.pem -ClusterId hci-sea-01'

    Run it on every node (e.g. with Invoke-Command -ComputerName (Get-ClusterNode).Name).
    Remove with: Unregister-ScheduledTask -TaskName rpowatch-collector -Confirm:$false
#>
[CmdletBinding()]
param(
    [Parameter(Mandatory)] [string] $ScriptPath,
    [Parameter(Mandatory)] [string] $Arguments,
    [string] $TaskName = 'rpowatch-collector',
    [timespan] $Every = (New-TimeSpan -Minutes 1)
)

$ErrorActionPreference = 'Stop'
$action = New-ScheduledTaskAction -Execute 'powershell.exe' `
    -Argument "-NoProfile -NonInteractive -ExecutionPolicy Bypass -File `"$ScriptPath`" $Arguments"
$trigger = New-ScheduledTaskTrigger -Once -At (Get-Date) -RepetitionInterval $Every
# A run that is still going when the next is due is not started twice; a stuck one is stopped.
$settings = New-ScheduledTaskSettingsSet -MultipleInstances IgnoreNew -ExecutionTimeLimit (New-TimeSpan -Minutes 5) `
    -StartWhenAvailable
$principal = New-ScheduledTaskPrincipal -UserId 'SYSTEM' -LogonType ServiceAccount -RunLevel Highest
Register-ScheduledTask -TaskName $TaskName -Action $action -Trigger $trigger -Settings $settings `
    -Principal $principal -Force | Out-Null
Write-Output "registered $TaskName on $env:COMPUTERNAME (every $Every)"
