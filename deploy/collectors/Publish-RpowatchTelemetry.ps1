<#
.SYNOPSIS
    Publishes this Azure Local node's Hyper-V Replica statistics and capacity to rpowatch over MQTT.

.DESCRIPTION
    Run once a minute on every node (Register-RpowatchCollector.ps1 sets up the scheduled task).
    Each run publishes two messages with mosquitto_pub (QoS 1):

      <Prefix>/<ClusterId>/<NodeId>/hyperv-replica
          Measure-VMReplication of the VMs on this node, as ConvertTo-Json writes it, with
          ReplicationFrequencySec merged in from Get-VMReplication (Measure-VMReplication has no
          interval) and SampledAt (when this ran). rpowatch reads it with the
          `hyperv_replica_json` adapter (docs/adapters.md).
      <Prefix>/<ClusterId>/<NodeId>/heartbeat
          The node's state and capacity as a canonical rpowatch heartbeat (contracts.md §1).

    Works in Windows PowerShell 5.1 (built into Azure Local) and PowerShell 7. Needs the Hyper-V
    module, and the FailoverClusters module for the node state and -IncludeStorage.

.EXAMPLE
    .\Publish-RpowatchTelemetry.ps1 -Broker mqtt.contoso.com -Port 8883 -CaFile C:\rpowatch\ca.pem `
        -ClusterId hci-sea-01 -Username collector -PasswordFile C:\rpowatch\mqtt-password.txt
#>
[CmdletBinding()]
param(
    [Parameter(Mandatory)] [string] $Broker,
    [int] $Port = 1883,
    # The Azure Local instance's id in rpowatch (the MQTT topic level and the heartbeat's cluster_id).
    [Parameter(Mandatory)] [string] $ClusterId,
    [string] $NodeId = $env:COMPUTERNAME.ToLowerInvariant(),
    [string] $Prefix = 'rpowatch',
    [string] $MosquittoPub = 'C:\Program Files\mosquitto\mosquitto_pub.exe',
    [string] $CaFile,
    [string] $Username,
    # A file holding the MQTT password (readable by SYSTEM and administrators only).
    [string] $PasswordFile,
    # Also report the cluster shared volumes (capacity, free space, online) in the heartbeat.
    [switch] $IncludeStorage
)

Set-StrictMode -Version 3
$ErrorActionPreference = 'Stop'

function Get-EpochMs([datetime] $When) {
    [long]([datetimeoffset]$When.ToUniversalTime()).ToUnixTimeMilliseconds()
}

function Publish-Message([string] $Topic, [string] $Json) {
    # Through a file: no quoting trouble, and UTF-8 without the BOM PowerShell 5.1 would add.
    $file = [System.IO.Path]::GetTempFileName()
    try {
        [System.IO.File]::WriteAllText($file, $Json, (New-Object System.Text.UTF8Encoding $false))
        $arguments = @('-h', $Broker, '-p', $Port, '-q', '1', '-i', "rpowatch-$NodeId", '-t', $Topic, '-f', $file)
        if ($CaFile) { $arguments += @('--cafile', $CaFile) }
        if ($Username) { $arguments += @('-u', $Username) }
        if ($PasswordFile) { $arguments += @('-P', (Get-Content -Raw -LiteralPath $PasswordFile).Trim()) }
        & $MosquittoPub @arguments
        if ($LASTEXITCODE -ne 0) { throw "mosquitto_pub exited with $LASTEXITCODE publishing to $Topic" }
    }
    finally {
        Remove-Item -LiteralPath $file -ErrorAction SilentlyContinue
    }
}

$sampledAt = [datetime]::UtcNow  # a plain DateTime: 5.1 writes it as \/Date(ms)\/ (Get-Date would add fields)

# --- Hyper-V Replica ------------------------------------------------------------------------
# Only the properties the adapter reads: a host with hundreds of VMs stays well under 1 MB.
$frequency = @{}
foreach ($r in @(Get-VMReplication -ErrorAction SilentlyContinue)) { $frequency[[string]$r.VMId] = $r.ReplicationFrequencySec }
$samples = @(Measure-VMReplication -ErrorAction SilentlyContinue | Select-Object `
    VMName, VMId, PrimaryServerName, ReplicaServerName, CurrentReplicaServerName, ComputerName,
    ReplicationState, ReplicationHealth, ReplicationMode, LastReplicationTime, LastAppliedLogTime,
    LastTestFailoverInitiatedTime, PendingReplicationSize, AverageReplicationSize, AverageReplicationLatency,
    MissedReplicationCount, SuccessfulReplicationCount,
    @{ Name = 'ReplicationFrequencySec'; Expression = { $frequency[[string]$_.VMId] } },
    @{ Name = 'SampledAt'; Expression = { $sampledAt } })
if ($samples.Count -gt 0) {
    $json = ConvertTo-Json -InputObject $samples -Depth 3 -Compress
    Publish-Message "$Prefix/$ClusterId/$NodeId/hyperv-replica" $json
}

# --- node capacity: a canonical heartbeat -----------------------------------------------------
$computer = Get-CimInstance -ClassName Win32_ComputerSystem
$processors = @(Get-CimInstance -ClassName Win32_Processor)
$running = @(Get-VM | Where-Object { $_.State -eq 'Running' })
$state = 'up'
if (Get-Command Get-ClusterNode -ErrorAction SilentlyContinue) {
    $clusterNode = Get-ClusterNode -Name $env:COMPUTERNAME
    $state = switch ([string]$clusterNode.State) { 'Up' { 'up' } 'Paused' { 'maintenance' } default { 'down' } }
}
$load = ($processors | Measure-Object -Property LoadPercentage -Average).Average
$heartbeat = [ordered]@{
    event_id          = "${NodeId}:$(Get-EpochMs $sampledAt)"
    ts                = Get-EpochMs $sampledAt
    cluster_id        = $ClusterId
    node_id           = $NodeId
    state             = $state
    memory_bytes      = [long]$computer.TotalPhysicalMemory
    memory_used_bytes = [long](($running | Measure-Object -Property MemoryAssigned -Sum).Sum)
    cpu_cores         = [int](($processors | Measure-Object -Property NumberOfLogicalProcessors -Sum).Sum)
}
if ($null -ne $load) { $heartbeat.cpu_used_ratio = [math]::Round($load / 100, 3) }
if ($IncludeStorage -and (Get-Command Get-ClusterSharedVolume -ErrorAction SilentlyContinue)) {
    $heartbeat.storage = @(Get-ClusterSharedVolume | ForEach-Object {
        $partition = $_.SharedVolumeInfo[0].Partition
        [ordered]@{
            path_id        = $_.Name
            capacity_bytes = [long]$partition.Size
            free_bytes     = [long]$partition.FreeSpace
            online         = ([string]$_.State -eq 'Online')
        }
    })
}
Publish-Message "$Prefix/$ClusterId/$NodeId/heartbeat" (ConvertTo-Json -InputObject $heartbeat -Depth 3 -Compress)
